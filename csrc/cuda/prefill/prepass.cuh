// Selection pre-pass (DESIGN §4): Poff[b][I][j] = sum of S[k][j] over all query rows k in
// blocks before block I (blocks of kTile rows). The forward and backward kernels get
// F[i][j] = Poff[b][I][j] + (exclusive cumsum of S down the rows of block I), so F never
// exists as an N x N tensor. One call covers the query blocks of one superchunk (dispatch.h):
// Poff rows I - begin, from the carry (the column sums of all blocks before `begin`), which
// it then advances past the superchunk, keeps, or first retreats to `begin` (the backward walks
// the superchunks last to first). Poff and the carry are laid out for seqlen (N) columns per
// batch element; a varlen sequence of n <= N rows uses its first ceil(n/32) blocks and n
// columns. Torch-free.
#pragma once

#include "cuda/prefill/common.cuh"
#include "cuda/prefill/dispatch.h"
#include "cuda/prefill/tc_prepass.cuh"

namespace selattn::cuda {

static_assert(kSelBlockRows == kTile, "Poff blocks are the SIMT tile rows");

// Grid (column tiles, query blocks of the superchunk, batch). Writes Csum[b][I][j] =
// sum_{k in block I} S[k][j] into poff row I - begin for every column tile the grid covers; the
// scan below turns it into the exclusive prefix over blocks.
template <typename T, int kNumChunks>
__global__ void __launch_bounds__(kThreads)
    selection_colsum_kernel(const PrefillParams p, acc_t<T>* __restrict__ poff,
                            const SuperChunk sc) {
  using A = acc_t<T>;
  SELATTN_SHARED(xs, SmemTile<A>);
  SELATTN_SHARED(ys, SmemTile<A>);
  SELATTN_SHARED(s_tile, SmemTile<A>);
  const int64_t w = p.seqlen;  // Poff row width (varlen: the longest sequence)
  const int64_t col0 = int64_t(blockIdx.x) * kTile;
  const int64_t qb = sc.begin + blockIdx.y;
  const int64_t row0 = qb * kTile;
  const int64_t b = blockIdx.z;
  const SeqRows rows = seq_rows(p, b);
  const int64_t n = rows.n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  A* csum = poff + (b * sc.stride + blockIdx.y) * w;

  // Query blocks past this sequence's end (varlen) are never read. Uniform, before any barrier.
  if (row0 >= n) return;
  // S[k][j] needs j < k <= row0 + kTile - 1: tiles from that column on are all zero. The exit
  // is uniform across the CTA, before any barrier.
  if (col0 >= row0 + kTile - 1) {
    if (threadIdx.x < kTile && col0 + threadIdx.x < n) csum[col0 + threadIdx.x] = A(0);
    return;
  }

  const T* q_sel = static_cast<const T*>(p.q_sel) + b * p.q_sel_batch_stride +
                   rows.start * p.q_sel_row_stride;
  const T* k_sel = static_cast<const T*>(p.k_sel) + b * p.k_sel_batch_stride +
                   rows.start * p.k_sel_row_stride;
  selection_tile<kNumChunks>(s_tile, xs, ys, q_sel, p.q_sel_row_stride, k_sel,
                             p.k_sel_row_stride, row0, col0, n, int(p.head_dim), A(p.scale));
  if (warp == 0) {
    A sum = A(0);
    for (int r = 0; r < kTile; ++r) sum += s_tile[r][lane];
    if (col0 + lane < n) csum[col0 + lane] = sum;
  }
}

// What the scan does with the carry (B x N column sums of the blocks before some block).
enum class CarryMode : int {
  kKeep = 0,     // carry = sums before `begin`: Poff rows from it, carry unchanged
  kAdvance = 1,  // the same, then carry += the superchunk's sums (= sums before `end`)
  kRetreat = 2,  // carry = sums before `end`: first carry -= the superchunk's sums, then kKeep
};

// One thread per (b, j < ncols): exclusive prefix over the superchunk's query blocks, in place,
// starting from the carry, summed in fp64 (dispatch.h, carry_bytes) and rounded per row.
// Columns >= ncols have S = 0 in every row of the superchunk, so their carry stays what it was
// (0 up to here) and their Poff rows are never read. Varlen (cu_seqlens != nullptr): only the
// blocks and columns of sequence b's own length (the others are never written nor read).
template <typename A>
__global__ void exclusive_scan_blocks_kernel(A* __restrict__ poff, double* __restrict__ carry,
                                             int64_t batch, int64_t w, int64_t ncols,
                                             const SuperChunk sc, CarryMode mode,
                                             const int32_t* __restrict__ cu_seqlens) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * ncols) return;
  const int64_t b = idx / ncols, j = idx % ncols;
  const int64_t len = cu_seqlens ? int64_t(cu_seqlens[b + 1]) - cu_seqlens[b] : w;
  if (j >= len) return;
  const int64_t last = num_sel_blocks(len) < sc.end ? num_sel_blocks(len) : sc.end;
  const int64_t rows = last > sc.begin ? last - sc.begin : 0;
  A* col = poff + b * sc.stride * w + j;
  double run = carry[b * w + j];
  if (mode == CarryMode::kRetreat) {
    double tot = 0.0;
    for (int64_t r = 0; r < rows; ++r) tot += double(col[r * w]);
    run -= tot;
    carry[b * w + j] = run;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const double c = double(col[r * w]);
    col[r * w] = A(run);
    run += c;
  }
  if (mode == CarryMode::kAdvance) carry[b * w + j] = run;
}

// Poff rows of superchunk sc (and the carry per `mode`). The carry must have been zeroed before
// the first call of a pass. kTcDim > 0: the column sums on the tensor cores (tc_prepass.cuh;
// bf16/fp16, head dim kTcDim, 16-byte aligned q_sel/k_sel rows), used by the tensor-core
// forward and backward; 0: the SIMT kernel above, used by the SIMT paths of every dtype, so
// that their pre-pass sums exactly the S of their own selection_tile and they stay an
// independent check of the tensor-core paths (SELATTN_CUDA_FORCE_SIMT, SELATTN_CUDA_TC_BWD=0).
template <typename T, int kNumChunks, int kTcDim = 0>
cudaError_t launch_selection_prepass(const PrefillParams& p, acc_t<T>* poff, double* carry,
                                     const SuperChunk& sc, CarryMode mode, cudaStream_t stream) {
  const int64_t n = p.seqlen;
  if (sc.end - sc.begin > 65535 || p.batch > 65535) return cudaErrorInvalidConfiguration;
  // Keys past the superchunk's last row are never selected by its rows.
  const int64_t ncols = n < sc.end * kTile ? n : sc.end * kTile;
  cudaError_t err;
  if constexpr (kTcDim > 0) {
    err = launch_tc_selection_colsum<T, kTcDim>(p, poff, sc, stream);
  } else {
    const dim3 grid(unsigned(ceil_div(ncols, kTile)), unsigned(sc.end - sc.begin),
                    unsigned(p.batch));
    err = launch_kernel(selection_colsum_kernel<T, kNumChunks>, grid, dim3(kThreads), 0, stream,
                        p, poff, sc);
  }
  if (err != cudaSuccess) return err;
  const int64_t cols = p.batch * ncols;
  return launch_kernel(exclusive_scan_blocks_kernel<acc_t<T>>, dim3(unsigned(ceil_div(cols, 256))),
                       dim3(256), 0, stream, poff, carry, p.batch, n, ncols, sc, mode,
                       p.cu_seqlens);
}

// The superchunk with index s (in 32-row query blocks).
inline SuperChunk superchunk(const PrefillParams& p, int64_t s) {
  const int64_t per = superchunk_blocks(p), nqb = num_sel_blocks(p.seqlen);
  const int64_t begin = s * per;
  return SuperChunk{begin, begin + per < nqb ? begin + per : nqb, per};
}

}  // namespace selattn::cuda
