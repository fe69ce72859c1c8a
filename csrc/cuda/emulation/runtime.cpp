// Fiber runtime of the CPU execution target (see runtime.h). One host thread runs a grid block
// by block; the threads of a block are fibers with their own stacks, switched only at
// __syncthreads, __syncwarp and warp collectives, in round-robin order. This file is compiled
// without ThreadSanitizer instrumentation (its scheduler state is not kernel memory) but with
// the fiber and synchronisation annotations that let TSan check the kernels: a barrier is a
// release by every arriving thread and an acquire by every leaving one; a fiber switch, a
// shuffle, ldmatrix and mma order nothing; blocks of one launch are unordered; launches in
// order. So two accesses to one word by different CUDA threads, one a write, with no barrier
// between them, are reported, lanes of one warp included.
#include "cuda/emulation/runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "cuda/emulation/half.h"

// SELATTN_EMU_TSAN: set by the build for this file, which is not itself instrumented, so
// __SANITIZE_THREAD__ is not defined here even in a ThreadSanitizer build.
#if defined(__SANITIZE_THREAD__) && !defined(SELATTN_EMU_TSAN)
#define SELATTN_EMU_TSAN 1
#endif
#if defined(SELATTN_EMU_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#endif
#if defined(__SANITIZE_ADDRESS__)
#define SELATTN_EMU_ASAN 1
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     size_t* size_old);
void __asan_unpoison_memory_region(const volatile void* addr, size_t size);
}
#endif

// ---- context switch ------------------------------------------------------------------------
// selattn_emu_switch(&save_sp, new_sp): saves the callee-saved registers and the FP control
// words on the current stack, stores the stack pointer in *save_sp, and resumes the context
// saved at new_sp. x86-64 System V only; other hosts use ucontext (slower, same semantics).
#if defined(__x86_64__)
extern "C" void selattn_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .pushsection .text
  .globl selattn_emu_switch
  .type selattn_emu_switch,@function
selattn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size selattn_emu_switch,.-selattn_emu_switch
  .popsection
)");
#else
#include <ucontext.h>
#endif

namespace selattn::emu {
namespace {

#if defined(SELATTN_EMU_TSAN)
constexpr size_t kStackBytes = 512 * 1024;
#elif defined(SELATTN_EMU_ASAN)
constexpr size_t kStackBytes = 192 * 1024;  // unpoisoned at every reuse: keep it small
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

enum class State { kReady, kBlockBarrier, kWarpBarrier, kDone };
enum Collective : int { kSyncWarp = 1, kShuffle = 2, kLdmatrix = 3, kMma = 4 };

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  dim3 tid;
  int linear = 0;
  State state = State::kReady;
  void* tsan = nullptr;
  void* asan_fake = nullptr;
  std::vector<std::vector<AsyncCopy>> async;  // cp.async groups not landed yet
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
};

struct Warp {
  unsigned existing = 0;  // lanes that exist (the last warp of a block may be partial)
  unsigned arrived = 0, mask = 0;
  int kind = 0;
  uint64_t gen = 0;
  alignas(16) unsigned char slot[2][32][32];  // double-buffered by generation parity
  char sync[2];                               // TSan sync addresses of __syncwarp
};

struct SharedAlloc {
  const void* site;
  char* ptr;
  size_t bytes;
};

struct Block {
  dim3 idx, dim, grid;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0, arrived = 0, current = -1;
  uint64_t gen = 0;
  char sync[2];  // TSan sync addresses of __syncthreads, by generation parity
  std::vector<SharedAlloc> shared;
  size_t static_bytes = 0;
  char* dyn = nullptr;
  size_t dyn_bytes = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  void* main_sp = nullptr;
  void* main_tsan = nullptr;
  void* main_fake = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  bool failed = false;
  void* exit_sync = nullptr;
#if !defined(__x86_64__)
  ucontext_t main_uc;
#endif
};

thread_local Block* g_block = nullptr;
thread_local int g_last_error = 0;

std::mutex g_mutex;  // reports, stats, attributes
std::vector<std::string> g_reports;
Stats g_stats{};
std::unordered_map<const void*, size_t> g_max_dynamic;
std::vector<std::string> g_launched;

Block& block() { return *g_block; }
Fiber& fiber() { return g_block->fibers[g_block->current]; }

void ignore_writes_begin() {
#ifdef SELATTN_EMU_TSAN
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
#endif
}
void ignore_writes_end() {
#ifdef SELATTN_EMU_TSAN
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
#endif
}
void tsan_release(void* addr) {
#ifdef SELATTN_EMU_TSAN
  __tsan_release(addr);
#else
  (void)addr;
#endif
}
void tsan_acquire(void* addr) {
#ifdef SELATTN_EMU_TSAN
  __tsan_acquire(addr);
#else
  (void)addr;
#endif
}

std::string where() {
  if (g_block == nullptr || g_block->current < 0) return "host";
  const Block& b = block();
  const Fiber& f = b.fibers[b.current];
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", b.idx.x, b.idx.y, b.idx.z,
                f.tid.x, f.tid.y, f.tid.z);
  return buf;
}

void report(const std::string& what) { add_report(where() + ": " + what); }

// Memory the kernels see as fresh: allocated and poisoned with TSan's write tracking off, so
// the poison counts as nobody's write (a read of it is a wrong answer, not a race report).
char* alloc_poisoned(size_t bytes, size_t align) {
  void* p = nullptr;
  ignore_writes_begin();
  if (posix_memalign(&p, align < sizeof(void*) ? sizeof(void*) : align, bytes) != 0) p = nullptr;
  if (p != nullptr) std::memset(p, 0xff, bytes);
  ignore_writes_end();
  if (p == nullptr) {
    std::fprintf(stderr, "selattn emulation: out of memory (%zu bytes)\n", bytes);
    std::abort();
  }
  return static_cast<char*>(p);
}

// Stacks are reused across blocks, except under TSan (a reused stack would look like a race
// between two blocks' threads) and after a deadlock (its abandoned frames stay poisoned).
thread_local std::vector<char*> g_stack_pool;

char* map_stack() {
#ifndef SELATTN_EMU_TSAN
  if (!g_stack_pool.empty()) {
    char* s = g_stack_pool.back();
    g_stack_pool.pop_back();
    return s;
  }
#endif
  ignore_writes_begin();
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ignore_writes_end();
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "selattn emulation: cannot map a fiber stack\n");
    std::abort();
  }
  return static_cast<char*>(p);
}

void report(const std::string& what);

void release_block_barrier(Block& b) {
  // Threads that exited count as arrived (as on the hardware), but a __syncthreads that some
  // threads of the block skip is a bug (synccheck's "barrier divergence") even where it works.
  if (b.live < static_cast<int>(b.fibers.size()))
    report("barrier divergence: __syncthreads completed while " +
           std::to_string(b.fibers.size() - size_t(b.live)) + " threads of the block had exited");
  for (Fiber& f : b.fibers)
    if (f.state == State::kBlockBarrier) f.state = State::kReady;
  b.arrived = 0;
  ++b.gen;
}

int next_ready(const Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  for (int k = 1; k <= n; ++k) {
    const int i = (b.current + k + n) % n;
    if (b.fibers[i].state == State::kReady) return i;
  }
  return -1;
}

[[noreturn]] void fiber_entry();

void switch_to(Block& b, int next, bool exiting) {
  const int prev = b.current;
  void** save = prev < 0 ? &b.main_sp : &b.fibers[prev].sp;
#ifdef SELATTN_EMU_TSAN
  __tsan_switch_to_fiber(next < 0 ? b.main_tsan : b.fibers[next].tsan, 1 /* no sync */);
#endif
#ifdef SELATTN_EMU_ASAN
  void** fake = exiting ? nullptr : (prev < 0 ? &b.main_fake : &b.fibers[prev].asan_fake);
  if (next < 0)
    __sanitizer_start_switch_fiber(fake, b.main_bottom, b.main_size);
  else
    __sanitizer_start_switch_fiber(fake, b.fibers[next].stack, kStackBytes);
#endif
  (void)exiting;
  b.current = next;
  ++g_stats.switches;
#if defined(__x86_64__)
  selattn_emu_switch(save, next < 0 ? b.main_sp : b.fibers[next].sp);
#else
  (void)save;
  swapcontext(prev < 0 ? &b.main_uc : &b.fibers[prev].uc, next < 0 ? &b.main_uc : &b.fibers[next].uc);
#endif
  // Resumed as `prev`.
#ifdef SELATTN_EMU_ASAN
  __sanitizer_finish_switch_fiber(prev < 0 ? b.main_fake : b.fibers[prev].asan_fake, nullptr,
                                  nullptr);
#endif
}

std::string describe_waits(const Block& b) {
  int at_block = 0, at_warp = 0, done = 0;
  for (const Fiber& f : b.fibers) {
    at_block += f.state == State::kBlockBarrier;
    at_warp += f.state == State::kWarpBarrier;
    done += f.state == State::kDone;
  }
  char buf[200];
  std::snprintf(buf, sizeof buf, "%d threads wait at __syncthreads, %d at a warp collective, %d exited",
                at_block, at_warp, done);
  return buf;
}

// The current fiber cannot go on: run another one, or give up on the block.
void wait_here(Block& b) {
  int next = next_ready(b);
  if (next < 0) {
    report("deadlock (a barrier or warp collective not reached by every thread it waits for): " +
           describe_waits(b));
    b.failed = true;
    switch_to(b, -1, false);  // never resumed: main abandons the block
    std::abort();
  }
  switch_to(b, next, false);
}

[[noreturn]] void fiber_entry() {
  Block& b = block();
#ifdef SELATTN_EMU_ASAN
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
  if (b.main_bottom == nullptr) b.main_bottom = bottom, b.main_size = size;
#endif
  b.body(b.ctx);
  Fiber& f = fiber();
  for (const auto& group : f.async)
    if (!group.empty()) {
      report("thread exited with cp.async copies never waited for (cp.async.wait_group)");
      b.failed = true;
      break;
    }
  f.state = State::kDone;
  --b.live;
  tsan_release(b.exit_sync);
  // Exited threads count as arrived at __syncthreads (as on the hardware).
  if (b.arrived > 0 && b.arrived == b.live) release_block_barrier(b);
  int next = next_ready(b);
  if (next < 0 && b.live > 0) {
    report("deadlock after a thread exited: " + describe_waits(b));
    b.failed = true;
  }
  switch_to(b, next < 0 ? -1 : next, true);
  std::abort();  // an exited fiber is never resumed
}

// A reused stack still carries the redzones of the frames of the fiber that exited on it
// (fiber_entry never returns, so ASan never unpoisons them).
void fresh_stack(char* stack) {
#ifdef SELATTN_EMU_ASAN
  __asan_unpoison_memory_region(stack, kStackBytes);
#else
  (void)stack;
#endif
}

#if defined(__x86_64__)
void* initial_stack(char* stack) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;  // fiber_entry's return address: it never returns
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp rbx r12 r13 r14 r15
  --sp;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
  return sp;
}
#endif

// Resources of the blocks of one launch. Stacks and TSan fibers go back after every block
// (unmapping a stack and destroying a fiber order nothing, and keeping a launch's worth alive
// exhausts the process's memory maps under TSan). Shared-memory allocations are freed after
// every block normally, but under TSan only at the end of the launch, after acquiring every
// thread's exit: a free is a write, and ordering it would order the next block after this one
// and hide races between blocks.
struct LaunchResources {
  std::vector<char*> stacks, allocations;
  std::vector<void*> tsan_fibers;
  void release_block(bool reuse_stacks) {
    for (char* s : stacks) {
#ifndef SELATTN_EMU_TSAN
      if (reuse_stacks) {
        g_stack_pool.push_back(s);
        continue;
      }
#endif
      (void)reuse_stacks;
      munmap(s, kStackBytes);
    }
#ifdef SELATTN_EMU_TSAN
    for (void* f : tsan_fibers) __tsan_destroy_fiber(f);
#else
    release_allocations();
#endif
    stacks.clear(), tsan_fibers.clear();
  }
  void release_allocations() {
    for (char* a : allocations) std::free(a);
    allocations.clear();
  }
};

bool run_block(Block& b, LaunchResources& res, size_t dyn_bytes) {
  const int threads = static_cast<int>(b.dim.x * b.dim.y * b.dim.z);
  b.fibers.assign(threads, Fiber{});
  b.warps.assign((threads + 31) / 32, Warp{});
  for (int w = 0; w < static_cast<int>(b.warps.size()); ++w) {
    const int lanes = threads - 32 * w < 32 ? threads - 32 * w : 32;
    b.warps[w].existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }
  b.live = threads, b.arrived = 0, b.current = -1, b.gen = 0, b.failed = false;
  b.shared.clear();
  b.static_bytes = 0;
  b.dyn = alloc_poisoned(dyn_bytes, 16);
  b.dyn_bytes = dyn_bytes;
  res.allocations.push_back(b.dyn);
#ifdef SELATTN_EMU_TSAN
  b.main_tsan = __tsan_get_current_fiber();
#endif
  for (int t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.linear = t;
    f.tid = dim3(t % b.dim.x, (t / b.dim.x) % b.dim.y, t / (b.dim.x * b.dim.y));
    f.stack = map_stack();
    fresh_stack(f.stack);
    res.stacks.push_back(f.stack);
#ifdef SELATTN_EMU_TSAN
    f.tsan = __tsan_create_fiber(0);
    res.tsan_fibers.push_back(f.tsan);
#endif
#if defined(__x86_64__)
    f.sp = initial_stack(f.stack);
#else
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_entry), 0);
#endif
  }
  switch_to(b, 0, false);
  const bool ok = !b.failed;
  for (const SharedAlloc& s : b.shared) res.allocations.push_back(s.ptr);
  b.shared.clear();
  return ok;
}

}  // namespace

// ---- API ---------------------------------------------------------------------------------

const dim3& thread_idx() { return fiber().tid; }
const dim3& block_idx() { return block().idx; }
const dim3& block_dim() { return block().dim; }
const dim3& grid_dim() { return block().grid; }

void sync_block() {
  Block& b = block();
  const uint64_t gen = b.gen;
  tsan_release(&b.sync[gen & 1]);
  if (++b.arrived == b.live) {
    release_block_barrier(b);
  } else {
    fiber().state = State::kBlockBarrier;
    wait_here(b);
  }
  tsan_acquire(&b.sync[gen & 1]);
}

namespace {

// Every lane of `mask` hands in `bytes` bytes and waits until all have; returns the table of
// what the lanes handed in (row = lane), valid until this lane's next collective.
const unsigned char (*warp_exchange(int kind, unsigned mask, const void* in, size_t bytes))[32] {
  Block& b = block();
  Fiber& f = fiber();
  const int lane = f.linear % 32;
  Warp& w = b.warps[f.linear / 32];
  if (((mask >> lane) & 1u) == 0) report("a warp collective's mask does not include the calling lane");
  if ((mask & ~w.existing) != 0) report("a warp collective's mask names lanes that do not exist");
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && ((w.existing >> l) & 1u) &&
        b.fibers[(f.linear / 32) * 32 + l].state == State::kDone)
      report("a warp collective waits for a lane that has exited");
  if (w.arrived == 0) {
    w.mask = mask & w.existing;
    w.kind = kind;
  } else if (w.mask != (mask & w.existing) || w.kind != kind) {
    report("lanes of one warp are in different warp collectives (divergence)");
  }
  const uint64_t gen = w.gen;
  if (bytes > 0) std::memcpy(w.slot[gen & 1][lane], in, bytes);  // __syncwarp hands in nothing
  w.arrived |= 1u << lane;
  if (w.arrived == w.mask) {
    for (int l = 0; l < 32; ++l) {
      if (((w.mask >> l) & 1u) == 0) continue;
      Fiber& other = b.fibers[(f.linear / 32) * 32 + l];
      if (other.state == State::kWarpBarrier) other.state = State::kReady;
    }
    w.arrived = 0;
    ++w.gen;
  } else {
    f.state = State::kWarpBarrier;
    wait_here(b);
  }
  return w.slot[gen & 1];
}

}  // namespace

void sync_warp(unsigned mask) {
  Block& b = block();
  Warp& w = b.warps[fiber().linear / 32];
  const uint64_t gen = w.gen;
  tsan_release(&w.sync[gen & 1]);
  warp_exchange(kSyncWarp, mask, nullptr, 0);
  tsan_acquire(&w.sync[gen & 1]);
}

void shuffle_bytes(ShuffleKind kind, unsigned mask, const void* in, void* out, size_t bytes,
                   int arg, int width) {
  const int lane = fiber().linear % 32;
  const auto table = warp_exchange(kShuffle, mask, in, bytes);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    report("shuffle width must be a power of two in [1, 32]");
    width = 32;
  }
  const int seg = lane & ~(width - 1);
  int src = lane;
  switch (kind) {
    case ShuffleKind::kIndex: src = seg + (arg & (width - 1)); break;
    case ShuffleKind::kUp: src = lane - arg >= seg ? lane - arg : lane; break;
    case ShuffleKind::kDown: src = lane + arg < seg + width ? lane + arg : lane; break;
    case ShuffleKind::kXor: {
      const int x = lane ^ arg;
      src = (x >= 0 && x < 32 && (x & ~(width - 1)) <= seg) ? x : lane;
      break;
    }
  }
  if (((mask >> src) & 1u) == 0) {
    report("a shuffle reads a lane outside its mask (undefined value)");
    src = lane;
  }
  std::memcpy(out, table[src], bytes);
}

void check_ldmatrix_row(const void* p) {
  const Block& b = block();
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) report("ldmatrix row address not 16-byte aligned");
  bool inside = c >= b.dyn && c + 16 <= b.dyn + b.dyn_bytes;
  for (const SharedAlloc& s : b.shared) inside = inside || (c >= s.ptr && c + 16 <= s.ptr + s.bytes);
  if (!inside) report("ldmatrix row outside the block's shared memory");
}

void ldmatrix_exchange(uint32_t (&r)[4], const void* row_bytes, bool trans) {
  const int lane = fiber().linear % 32;
  const auto rows = warp_exchange(kLdmatrix, 0xffffffffu, row_bytes, 16);
  // Matrix m's row k was addressed by lane 8m + k; each row holds 8 16-bit elements.
  auto elem = [&](int m, int row, int col) {
    uint16_t e;
    std::memcpy(&e, rows[8 * m + row] + 2 * col, 2);
    return uint32_t(e);
  };
  for (int m = 0; m < 4; ++m) {
    if (!trans)  // lane holds row lane/4, columns 2*(lane%4) and +1
      r[m] = elem(m, lane / 4, 2 * (lane % 4)) | (elem(m, lane / 4, 2 * (lane % 4) + 1) << 16);
    else  // transposed: lane holds column lane/4, rows 2*(lane%4) and +1
      r[m] = elem(m, 2 * (lane % 4), lane / 4) | (elem(m, 2 * (lane % 4) + 1, lane / 4) << 16);
  }
}

void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  const int lane = fiber().linear % 32;
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const auto frag = warp_exchange(kMma, 0xffffffffu, mine, sizeof mine);
  auto reg = [&](int l, int i) {
    uint32_t v;
    std::memcpy(&v, frag[l] + 4 * i, 4);
    return v;
  };
  auto value = [&](uint32_t r, int half) {
    const auto bits = static_cast<unsigned short>(half ? r >> 16 : r & 0xffffu);
    return bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
  };
  // A (16 x 16, row major): element (row, k) is in lane 4*(row%8) + (k%8)/2, register
  // (row/8) + 2*(k/8), half k%2. B (16 x 8, column major): element (k, n) is in lane
  // 4*n + (k%8)/2, register 4 + k/8, half k%2. C/D: c[i] is (g + 8*(i/2), 2t + i%2).
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    double sum = c[i];  // products of 16-bit floats are exact in double; one final rounding
    for (int k = 0; k < 16; ++k) {
      const double x = value(reg(4 * (row % 8) + (k % 8) / 2, row / 8 + 2 * (k / 8)), k % 2);
      const double y = value(reg(4 * col + (k % 8) / 2, 4 + k / 8), k % 2);
      sum += x * y;
    }
    c[i] = static_cast<float>(sum);
  }
}

void* block_shared(const void* site, size_t bytes, size_t align) {
  Block& b = block();
  for (const SharedAlloc& s : b.shared)
    if (s.site == site) return s.ptr;
  b.static_bytes += bytes;
  if (b.static_bytes > kMaxStaticShared) report("static shared memory exceeds 48 KiB per block");
  if (b.static_bytes + b.dyn_bytes > kMaxDynamicSharedOptin)
    report("shared memory exceeds the 227 KiB a block can have");
  char* p = alloc_poisoned(bytes, align);
  b.shared.push_back({site, p, bytes});
  return p;
}

void cp_async_push(const AsyncCopy& copy) {
  auto& groups = fiber().async;
  if (groups.empty()) groups.emplace_back();
  groups.back().push_back(copy);
}

void cp_async_commit() {
  auto& groups = fiber().async;
  if (groups.empty()) groups.emplace_back();
  groups.emplace_back();
}

size_t cp_async_pop(int keep, AsyncCopy* out, size_t cap) {
  auto& groups = fiber().async;
  size_t n = 0;
  while (n < cap && groups.size() > static_cast<size_t>(keep) + 1) {
    auto& oldest = groups.front();
    if (oldest.empty()) {
      groups.erase(groups.begin());
      continue;
    }
    out[n++] = oldest.back();
    oldest.pop_back();
  }
  return n;
}

unsigned char* dynamic_shared() { return reinterpret_cast<unsigned char*>(block().dyn); }

int take_last_error() {
  const int e = g_last_error;
  g_last_error = 0;
  return e;
}
int peek_last_error() { return g_last_error; }

const char* error_string(int err) {
  switch (err) {
    case 0: return "no error";
    case 1: return "invalid argument";
    case 9: return "invalid configuration argument";
    case 716: return "misaligned address";
    case 719: return "unspecified launch failure (emulation: see the reports)";
    case 801: return "operation not supported";
  }
  return "unknown error";
}

void set_max_dynamic_shared(const void* func, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_max_dynamic[func] = bytes;
}

void host_memset(void* ptr, int value, size_t bytes) { std::memset(ptr, value, bytes); }

int launch_grid(const void* func, dim3 grid, dim3 block_dim, size_t dynamic_smem,
                void (*body)(void*), void* ctx) {
  const uint64_t threads = uint64_t(block_dim.x) * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024 || block_dim.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    add_report("launch with an invalid grid or block shape");
    return g_last_error = 9;
  }
  size_t allowed = kDefaultDynamicShared;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_max_dynamic.find(func);
    if (it != g_max_dynamic.end()) allowed = it->second > allowed ? it->second : allowed;
    ++g_stats.launches;
    Dl_info info{};
    std::string name = "?";
    if (dladdr(func, &info) != 0 && info.dli_sname != nullptr) {
      int status = 0;
      char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
      name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
      std::free(demangled);
    }
    if (g_launched.size() < 10000) g_launched.push_back(name);
  }
  if (dynamic_smem > allowed) {
    add_report("launch asks for more dynamic shared memory than cudaFuncSetAttribute allowed");
    return g_last_error = 1;
  }
  Block b;
  b.grid = grid, b.dim = block_dim, b.body = body, b.ctx = ctx;
  char exit_sync = 0;
  b.exit_sync = &exit_sync;
  Block* outer = g_block;
  g_block = &b;
  LaunchResources res;
  bool ok = true;
  int64_t blocks = 0;
  for (unsigned z = 0; z < grid.z && ok; ++z)
    for (unsigned y = 0; y < grid.y && ok; ++y)
      for (unsigned x = 0; x < grid.x && ok; ++x) {
        b.idx = dim3(x, y, z);
        ok = run_block(b, res, dynamic_smem);
        ++blocks;
        res.release_block(ok);
      }
  g_block = outer;
  tsan_acquire(&exit_sync);  // the host sees everything the grid wrote
  res.release_allocations();
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_stats.blocks += blocks;
    g_stats.threads += blocks * int64_t(threads);
  }
  if (!ok) return g_last_error = 719;
  return g_last_error;
}

std::vector<std::string> reports() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_reports;
}

void clear_reports() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_reports.clear();
  g_launched.clear();
  g_stats = Stats{};
}

void add_report(const std::string& text) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_reports.size() < 1000) g_reports.push_back(text);
}

std::vector<std::string> launched_kernels() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_launched;
}

Stats stats() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_stats;
}

}  // namespace selattn::emu
