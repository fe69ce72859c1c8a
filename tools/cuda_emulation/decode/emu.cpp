// Host emulation of the CUDA decode kernels (csrc/cuda/decode_kernels.cuh) for machines without a
// GPU: one std::thread per CUDA thread, blocks run one after another, std::barrier for
// __syncthreads and warp shuffles, __shared__ as function statics. fp32/fp64 only (the bf16/fp16
// conversions are stubs). Built and driven by run.py.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; dim3() = default; dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
thread_local dim3 threadIdx, blockIdx;
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct __nv_bfloat16 { unsigned short v; };
struct __nv_bfloat162 { __nv_bfloat16 a, b; };
struct __half { unsigned short v; };
struct __half2 { __half a, b; };
inline float2 __bfloat1622float2(__nv_bfloat162) { return {0, 0}; }
inline float2 __half22float2(__half2) { return {0, 0}; }
inline __nv_bfloat16 __float2bfloat16(float) { return {}; }
inline __half __float2half(float) { return {}; }
typedef int cudaError_t;
typedef void* cudaStream_t;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
template <class T> T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double f; std::memcpy(&f, &i, 8); return f; }

std::barrier<>* block_bar;
struct Warp { std::barrier<> bar{32}; alignas(8) unsigned char slot[32][8]; };
std::vector<Warp>* warps;
inline void __syncthreads() { block_bar->arrive_and_wait(); }
template <class V> V __shfl_xor_sync(unsigned, V x, int o) {
  Warp& w = (*warps)[threadIdx.x / 32];
  int lane = threadIdx.x % 32;
  std::memcpy(w.slot[lane], &x, sizeof(V));
  w.bar.arrive_and_wait();
  V y;
  std::memcpy(&y, w.slot[lane ^ o], sizeof(V));
  w.bar.arrive_and_wait();
  return y;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}

#include "kernels_emu.h"

using namespace selattn;
using namespace selattn::cuda::decode;

template <class F>
void run_grid(dim3 grid, int threads, F kernel) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> bar(threads);
      std::vector<Warp> ws(threads / 32);
      block_bar = &bar;
      warps = &ws;
      std::vector<std::thread> ts;
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
          threadIdx = dim3(t);
          blockIdx = dim3(bx, by);
          kernel();
        });
      for (auto& th : ts) th.join();
    }
}

template <typename T, int D>
void emu_launch(const DecodeParams& p, const Workspace& ws) {
  using L = Layout<T, D>;
  constexpr int kSelectCols = kSelectThreads / L::kLanes;
  run_grid(dim3((ws.ncols + kSelectCols - 1) / kSelectCols, p.batch), kSelectThreads,
           [&] { select_kernel<T, D>(p, ws); });
  const int64_t cps = (ws.ncols + ws.splits - 1) / ws.splits;
  run_grid(dim3(ws.splits * ws.rows, p.batch), kAttendThreads,
           [&] { attend_kernel<T, D>(p, ws, cps); });
  run_grid(dim3(1 + (ws.rows + kFinishRowsPerBlock - 1) / kFinishRowsPerBlock, p.batch),
           kFinishThreads, [&] { finish_kernel<T, D>(p, ws); });
}

extern "C" int emu_decode(int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t c, int64_t D,
                          int64_t slots, int64_t budget, int64_t sel_head, double scale,
                          int has_tau, double tau, int64_t splits, void* q, void* k, void* v,
                          void* kc, void* vc, void* out, void* f, int64_t* pos,
                          int64_t* seq_len, int64_t* lengths) {
  DecodeParams p{};
  p.dtype = dtype == 0 ? DType::kFloat32 : DType::kFloat64;
  p.batch = B, p.heads_q = Hq, p.heads_kv = Hkv, p.chunk = c, p.head_dim = D, p.slots = slots;
  p.budget = budget, p.sel_head = sel_head, p.scale = scale, p.has_tau = has_tau, p.tau = tau;
  p.q = q, p.q_batch_stride = Hq * c * D, p.q_head_stride = c * D, p.q_row_stride = D;
  p.k_new = k, p.k_new_batch_stride = Hkv * c * D, p.k_new_head_stride = c * D, p.k_new_row_stride = D;
  p.v_new = v, p.v_new_batch_stride = Hkv * c * D, p.v_new_head_stride = c * D, p.v_new_row_stride = D;
  p.k_cache = kc, p.k_cache_batch_stride = Hkv * slots * D, p.k_cache_head_stride = slots * D, p.k_cache_row_stride = D;
  p.v_cache = vc, p.v_cache_batch_stride = Hkv * slots * D, p.v_cache_head_stride = slots * D, p.v_cache_row_stride = D;
  p.out = out, p.out_batch_stride = Hq * c * D, p.out_head_stride = c * D, p.out_row_stride = D;
  p.f = f, p.pos = pos, p.seq_len = seq_len, p.lengths = lengths;
  const size_t acc = dtype == 0 ? 4 : 8;
  Workspace ws(p, splits, acc);
  std::vector<unsigned char> buf(ws.bytes + 256);
  std::memset(buf.data(), 0xff, buf.size());  // garbage: kernels must initialise what they read
  p.workspace = buf.data();
  p.workspace_bytes = ws.bytes;
#define CASE(TT, DD) if (D == DD) { emu_launch<TT, DD>(p, ws); return 0; }
  if (dtype == 0) { CASE(float, 32) CASE(float, 64) CASE(float, 96) }
  else { CASE(double, 32) CASE(double, 64) }
  return 1;
}
