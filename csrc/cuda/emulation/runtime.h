// The fiber runtime of the CPU execution target (runtime.cpp): runs a CUDA grid block by block,
// each CUDA thread a fiber; barriers and warp collectives switch fibers. Everything a kernel
// can do wrong that the hardware would not forgive (a barrier not reached by every thread, a
// warp collective with lanes missing, a shuffle from a lane outside the mask, ldmatrix outside
// shared memory, too much shared memory) is a *report* (reports()), never a silent success.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda/emulation/vector_types.h"

namespace selattn::emu {

constexpr size_t kMaxStaticShared = 48 * 1024;          // per block, as on every CUDA GPU
constexpr size_t kDefaultDynamicShared = 48 * 1024;     // without cudaFuncSetAttribute
constexpr size_t kMaxDynamicSharedOptin = 227 * 1024;   // H100 / H200 opt-in maximum

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void sync_block();
void sync_warp(unsigned mask);

enum class ShuffleKind : int { kIndex, kUp, kDown, kXor };
void shuffle_bytes(ShuffleKind kind, unsigned mask, const void* in, void* out, size_t bytes,
                   int arg, int width);

template <typename V>
V shuffle(ShuffleKind kind, unsigned mask, V var, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= 8, "shuffles move 4 or 8 bytes");
  V out;
  shuffle_bytes(kind, mask, &var, &out, sizeof(V), arg, width);
  return out;
}

// Warp-wide exchange behind ldmatrix: each lane hands in the 16 bytes of the row it addresses
// (read by that lane, so the sanitizers attribute the read to it) and gets back its fragment.
void ldmatrix_exchange(uint32_t (&r)[4], const void* row_bytes, bool trans);
// Checks that [p, p + 16) lies in this block's shared memory and is 16-byte aligned.
void check_ldmatrix_row(const void* p);

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: D = A B + C for the warp,
// from the fragment tables of the PTX ISA.
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);

// cp.async as a deferred copy (arch.cuh's host branch). The runtime keeps each thread's copies
// not landed yet (committed groups oldest first, then the open group) in its own,
// uninstrumented memory, so the race checker sees only the copies themselves, which arch.cuh
// performs in the kernel's translation unit. A thread that exits with copies pending is a
// report.
struct AsyncCopy {
  void* dst;
  const void* src;
  uint32_t bytes, src_bytes;
};
void cp_async_push(const AsyncCopy& copy);  // into the open group
void cp_async_commit();                      // the open group becomes committed
// Takes up to `cap` copies of the committed groups beyond the newest `keep` (they must land
// now) into out; returns how many (0: none left).
size_t cp_async_pop(int keep, AsyncCopy* out, size_t cap);

// Shared memory of the running block: one allocation per declaration site, exact size,
// poisoned with 0xff bytes (NaN in every float format) when the block starts using it.
void* block_shared(const void* site, size_t bytes, size_t align);
unsigned char* dynamic_shared();

// Runtime API state.
int take_last_error();
int peek_last_error();
const char* error_string(int err);
void set_max_dynamic_shared(const void* func, size_t bytes);
void host_memset(void* ptr, int value, size_t bytes);

// Runs `grid` blocks of `block` threads; body(ctx) is the kernel call of one thread. Returns
// the launch status (and sets the last error), as a <<<>>> launch followed by
// cudaGetLastError would.
int launch_grid(const void* func, dim3 grid, dim3 block, size_t dynamic_smem, void (*body)(void*),
                void* ctx);

template <typename... KArgs, typename... Args>
int launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t dynamic_smem, Args&&... args) {
  // Converted to the kernel's parameter types once, as <<<>>> does; each thread gets a copy.
  using Params = std::tuple<std::decay_t<KArgs>...>;
  struct Call {
    void (*kernel)(KArgs...);
    Params params;
  } call{kernel, Params(std::forward<Args>(args)...)};
  return launch_grid(
      reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem,
      [](void* c) {
        Call& call = *static_cast<Call*>(c);
        Params mine = call.params;
        std::apply(call.kernel, mine);
      },
      &call);
}

// Diagnostics collected since the last clear_reports() (all host threads).
std::vector<std::string> reports();
void clear_reports();
void add_report(const std::string& text);

// Counters since the last clear_reports(): launches, blocks and fibers run.
struct Stats {
  int64_t launches, blocks, threads, switches;
};
Stats stats();
// Names of the kernels launched since the last clear_reports(), in launch order (demangled).
std::vector<std::string> launched_kernels();

}  // namespace selattn::emu
