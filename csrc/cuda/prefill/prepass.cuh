// Selection pre-pass (DESIGN §4): Poff[b][I][j] = sum of S[k][j] over all query rows k in
// blocks before block I (blocks of kTile rows). The forward and backward kernels get
// F[i][j] = Poff[b][I][j] + (exclusive cumsum of S down the rows of block I), so F never
// exists as an N x N tensor. Poff is laid out for seqlen (N) rows per batch element; a varlen
// sequence of n <= N rows uses its first ceil(n/32) blocks and n columns. Torch-free.
#pragma once

#include "cuda/prefill/common.cuh"
#include "cuda/prefill/dispatch.h"

namespace selattn::cuda {

static_assert(kSelBlockRows == kTile, "Poff blocks are the SIMT tile rows");

// Grid (column tiles, query blocks, batch). Writes Csum[b][I][j] = sum_{k in block I} S[k][j]
// into poff for every j < N; the scan below turns it into the exclusive prefix over blocks.
template <typename T, int kNumChunks>
__global__ void __launch_bounds__(kThreads)
    selection_colsum_kernel(const PrefillParams p, acc_t<T>* __restrict__ poff) {
  using A = acc_t<T>;
  SELATTN_SHARED(xs, SmemTile<A>);
  SELATTN_SHARED(ys, SmemTile<A>);
  SELATTN_SHARED(s_tile, SmemTile<A>);
  const int64_t nqb = num_sel_blocks(p.seqlen);
  const int64_t col0 = int64_t(blockIdx.x) * kTile;
  const int64_t qb = blockIdx.y;
  const int64_t row0 = qb * kTile;
  const int64_t b = blockIdx.z;
  const SeqRows rows = seq_rows(p, b);
  const int64_t n = rows.n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  A* csum = poff + (b * nqb + qb) * p.seqlen;

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

// One thread per (b, j): exclusive prefix over the query blocks, in place. Varlen
// (cu_seqlens != nullptr): only the blocks and columns of sequence b's own length.
template <typename A>
__global__ void exclusive_scan_blocks_kernel(A* __restrict__ poff, int64_t batch, int64_t nqb,
                                             int64_t n, const int32_t* __restrict__ cu_seqlens) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * n) return;
  const int64_t b = idx / n, j = idx % n;
  const int64_t len = cu_seqlens ? int64_t(cu_seqlens[b + 1]) - cu_seqlens[b] : n;
  if (j >= len) return;
  const int64_t blocks = num_sel_blocks(len);
  A* col = poff + b * nqb * n + j;
  A run = A(0);
  for (int64_t qb = 0; qb < blocks; ++qb) {
    const A c = col[qb * n];
    col[qb * n] = run;
    run += c;
  }
}

template <typename T, int kNumChunks>
cudaError_t launch_selection_prepass(const PrefillParams& p, acc_t<T>* poff,
                                     cudaStream_t stream) {
  const int64_t n = p.seqlen, nqb = num_sel_blocks(n);
  if (nqb > 65535 || p.batch > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned(ceil_div(n, kTile)), unsigned(nqb), unsigned(p.batch));
  cudaError_t err = launch_kernel(selection_colsum_kernel<T, kNumChunks>, grid, dim3(kThreads), 0,
                                  stream, p, poff);
  if (err != cudaSuccess) return err;
  const int64_t cols = p.batch * n;
  return launch_kernel(exclusive_scan_blocks_kernel<acc_t<T>>, dim3(unsigned(ceil_div(cols, 256))),
                       dim3(256), 0, stream, poff, p.batch, nqb, n, p.cu_seqlens);
}

}  // namespace selattn::cuda
