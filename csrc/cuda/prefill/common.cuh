// Device helpers shared by the SIMT prefill kernels: element/accumulator types, the staging of
// 32 x 32 chunks into shared memory, and warp reductions. Torch-free.
//
// Tiling used by every SIMT kernel: a CTA of kThreads = 256 threads (8 warps) works on
// kTile x kTile = 32 x 32 tiles of (query rows x keys). Thread (warp w, lane l) owns the tile
// elements (w + 8u, l) for u = 0..3, so a tile row lives in one warp (row reductions are warp
// shuffles) and a tile column is one lane index. head_dim is streamed through shared memory in
// kTile-wide chunks, which keeps shared memory small and static for every head dim and dtype.
#pragma once

#include "cuda/arch.cuh"

#include <cstdint>

#include "prefill_params.h"

namespace selattn::cuda {

constexpr int kTile = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerThread = kTile / kWarps;  // 4

// fp32 accumulation for fp32/bf16/fp16, fp64 for fp64 (DESIGN §1).
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Number of kTile-wide head_dim chunks a kernel is compiled for (head_dim <= 32 * chunks).
inline int head_dim_chunks(int64_t head_dim) {
  return head_dim <= 32 ? 1 : head_dim <= 64 ? 2 : head_dim <= 128 ? 4 : 8;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The rows of batch element b (PrefillParams::cu_seqlens): dense, rows [0, seqlen) of batch b;
// varlen, rows [start, start + n) of the packed tensors. Kernels add b * batch_stride +
// start * row_stride to every strided base pointer (one of the two terms is 0) and use n, not
// seqlen, in every tail guard; seqlen only sizes grids and the pre-pass workspace.
struct SeqRows {
  int64_t start, n;
};

__device__ __forceinline__ SeqRows seq_rows(const PrefillParams& p, int64_t b) {
  if (p.cu_seqlens == nullptr) return {0, p.seqlen};
  const int64_t start = p.cu_seqlens[b];
  return {start, int64_t(p.cu_seqlens[b + 1]) - start};
}

// Offset of position 0 of (b, head h) in a contiguous per-position buffer with `heads` values
// per position: dense (B, heads, seqlen) gives (b * heads + h) * seqlen, varlen
// (heads, total_rows) gives h * total_rows + start. lse, dlse, mem, dmem (heads = 1) and the
// backward's workspace accumulators (times head_dim) all use this layout.
__device__ __forceinline__ int64_t stats_offset(const PrefillParams& p, int64_t b, int64_t h,
                                                int64_t heads, SeqRows rows) {
  return p.cu_seqlens == nullptr ? (b * heads + h) * p.seqlen : h * p.total_rows + rows.start;
}

// The input rows of one CTA's (batch element b, q head h, kv head hk), each at position 0 of
// b's sequence: every prefill kernel reads through these, so the dense/varlen offset rule above
// lives in one place.
template <typename T>
struct SeqInputs {
  const T *q, *k, *v, *q_sel, *k_sel;
};

template <typename T>
__device__ __forceinline__ SeqInputs<T> seq_inputs(const PrefillParams& p, int64_t b, int64_t h,
                                                   int64_t hk, SeqRows rows) {
  const int64_t s0 = rows.start;
  SeqInputs<T> in;
  in.q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
         s0 * p.q_row_stride;
  in.k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
         s0 * p.k_row_stride;
  in.v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
         s0 * p.v_row_stride;
  in.q_sel = static_cast<const T*>(p.q_sel) + b * p.q_sel_batch_stride + s0 * p.q_sel_row_stride;
  in.k_sel = static_cast<const T*>(p.k_sel) + b * p.k_sel_batch_stride + s0 * p.k_sel_row_stride;
  return in;
}

// The backward's dout rows of (b, q head h), like seq_inputs (the forward has no dout).
template <typename T>
__device__ __forceinline__ const T* seq_dout(const PrefillParams& p, int64_t b, int64_t h,
                                             SeqRows rows) {
  return static_cast<const T*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride +
         rows.start * p.dout_row_stride;
}

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

__device__ __forceinline__ void store_elem(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_elem(double* p, double x) { *p = x; }
__device__ __forceinline__ void store_elem(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }
__device__ __forceinline__ void store_elem(__half* p, float x) { *p = __float2half(x); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return A(-INFINITY);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  return x;
}

// One 32 x 32 tile in shared memory; the +1 column keeps column walks (tile[lane][dd])
// free of bank conflicts.
template <typename A>
using SmemTile = A[kTile][kTile + 1];

// dst[r][c] = src[(row0 + r) * row_stride + d0 + c], zero past `rows` and past `head_dim`, so
// dot products over a whole chunk need no guards and tails contribute exactly 0.
template <typename T, typename A>
__device__ __forceinline__ void stage_chunk(SmemTile<A>& dst, const T* src, int64_t row_stride,
                                            int64_t row0, int64_t rows, int d0, int head_dim) {
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    const int64_t row = row0 + r;
    const int d = d0 + c;
    dst[r][c] = (row < rows && d < head_dim) ? A(to_acc(src[row * row_stride + d])) : A(0);
  }
}

// acc[u] = sum_d x[row0 + w + 8u, d] * y[col0 + lane, d] over the whole head dim: the
// thread's four tile elements of X Y^T. Stages chunks through xs/ys; all threads must call.
template <int kNumChunks, typename T, typename A>
__device__ void tile_dot(A (&acc)[kRowsPerThread], SmemTile<A>& xs, SmemTile<A>& ys,
                         const T* x, int64_t x_row_stride, int64_t row0, const T* y,
                         int64_t y_row_stride, int64_t col0, int64_t rows, int head_dim) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int u = 0; u < kRowsPerThread; ++u) acc[u] = A(0);
  for (int kc = 0; kc < kNumChunks; ++kc) {
    const int d0 = kc * kTile;
    if (d0 >= head_dim) break;  // uniform across the CTA, so the barriers below stay matched
    stage_chunk(xs, x, x_row_stride, row0, rows, d0, head_dim);
    stage_chunk(ys, y, y_row_stride, col0, rows, d0, head_dim);
    __syncthreads();
#pragma unroll 4
    for (int dd = 0; dd < kTile; ++dd) {
      const A yv = ys[lane][dd];
#pragma unroll
      for (int u = 0; u < kRowsPerThread; ++u) acc[u] += xs[warp + kWarps * u][dd] * yv;
    }
    __syncthreads();  // xs/ys are restaged by the next chunk or the caller
  }
}

// S[i][j] = relu(a) where 1 <= j < i < N (no BOS, no self, no future), else 0. `a` is the
// scaled selection logit.
template <typename A>
__device__ __forceinline__ A selection_score(A a, int64_t i, int64_t j, int64_t n) {
  return (i < n && j >= 1 && j < i && a > A(0)) ? a : A(0);
}

// s_tile[r][c] = S[row0 + r][col0 + c] of one batch element: the scaled selection logits,
// relu'd and structurally masked. Shared by the SIMT pre-pass and the SIMT forward and
// backward, so those three see bit-identical S. The tensor-core kernels (their pre-pass,
// tc_prepass.cuh, included) compute S with mma (another summation order) and the same
// selection_score mask: S, and so F and P, then differ from the SIMT ones in the last bits, and
// a tensor-core forward's lse is used by a SIMT backward only to that accuracy. All threads
// must call; s_tile is complete on return.
template <int kNumChunks, typename T, typename A>
__device__ void selection_tile(SmemTile<A>& s_tile, SmemTile<A>& xs, SmemTile<A>& ys,
                               const T* q_sel, int64_t q_sel_row_stride, const T* k_sel,
                               int64_t k_sel_row_stride, int64_t row0, int64_t col0, int64_t n,
                               int head_dim, A scale) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  A a[kRowsPerThread];
  tile_dot<kNumChunks>(a, xs, ys, q_sel, q_sel_row_stride, row0, k_sel, k_sel_row_stride, col0,
                       n, head_dim);
#pragma unroll
  for (int u = 0; u < kRowsPerThread; ++u) {
    const int r = warp + kWarps * u;
    s_tile[r][lane] = selection_score(scale * a[u], row0 + r, col0 + lane, n);
  }
  __syncthreads();
}

}  // namespace selattn::cuda
