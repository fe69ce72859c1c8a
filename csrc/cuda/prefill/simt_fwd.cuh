// SIMT prefill forward for every dtype and head dims 1..256: the obviously-correct path.
// One CTA per (query block of 32 rows, q head, batch); it walks the key tiles j0 <= its last
// row, and per tile
//   1. S tile = masked relu(scale * q_sel . k_sel)         (tile_dot, then selection_score)
//   2. F tile = Poff[block] + exclusive cumsum of S down the tile rows (warp 0, one lane per key)
//   3. logits = scale * q . k - F, causal mask, online softmax in registers
//   4. O += P V, with P broadcast from the owning lane by shuffles.
// With p.mem set (the auxiliary memory loss), the head-0 CTAs also sum min(F, mem_tau) over the
// keys j <= i of each row from the same F tiles, and write mem[b][i] once: each (b, i) has
// exactly one head-0 CTA, so there are no atomics and the other heads pay nothing.
// Varlen (p.cu_seqlens): CTAs whose query block starts past their sequence's end exit at once.
// Torch-free.
#pragma once

#include "cuda/prefill/prepass.cuh"

namespace selattn::cuda {

template <typename T, int kNumChunks>
__global__ void __launch_bounds__(kThreads, 1)
    simt_fwd_kernel(const PrefillParams p, const acc_t<T>* __restrict__ poff,
                    const SuperChunk sc) {
  using A = acc_t<T>;
  SELATTN_SHARED(xs, SmemTile<A>);
  SELATTN_SHARED(ys, SmemTile<A>);
  SELATTN_SHARED(s_tile, SmemTile<A>);
  SELATTN_SHARED(f_tile, SmemTile<A>);
  const int head_dim = int(p.head_dim);
  const int64_t qb = sc.end - 1 - blockIdx.x;  // the longest rows first: better tail balance
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const int64_t row0 = qb * kTile;
  const SeqRows rows = seq_rows(p, b);
  const int64_t n = rows.n;
  if (row0 >= n) return;  // past this sequence (varlen): uniform, before any barrier
  const int64_t last_row = row0 + kTile - 1 < n - 1 ? row0 + kTile - 1 : n - 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const A scale = A(p.scale);
  // Uniform across the CTA (depends on h only), so the warp_sum below is taken by whole warps.
  const bool sum_mem = h == 0 && p.mem != nullptr && p.mem_tau > 0;
  const A mem_tau = A(p.mem_tau);

  const int64_t s0 = rows.start;
  const auto [q, k, v, q_sel, k_sel] = seq_inputs<T>(p, b, h, hk, rows);
  const A* poff_block = poff + (b * sc.stride + qb - sc.begin) * p.seqlen;

  // Thread owns output rows r_u = warp + 8u and head-dim columns kc * 32 + lane.
  A o[kRowsPerThread][kNumChunks];
  A m[kRowsPerThread], l[kRowsPerThread];
  A mem_part[kRowsPerThread];  // this lane's share of sum_j min(F[r_u][j], mem_tau)
#pragma unroll
  for (int u = 0; u < kRowsPerThread; ++u) {
    m[u] = neg_inf<A>();
    l[u] = A(0);
    mem_part[u] = A(0);
#pragma unroll
    for (int kc = 0; kc < kNumChunks; ++kc) o[u][kc] = A(0);
  }

  for (int64_t col0 = 0; col0 <= last_row; col0 += kTile) {
    // 1. Selection tile.
    selection_tile<kNumChunks>(s_tile, xs, ys, q_sel, p.q_sel_row_stride, k_sel,
                               p.k_sel_row_stride, row0, col0, n, head_dim, scale);

    // 2. F tile. F depends on the rows above, held by other warps, hence the shared tile.
    if (warp == 0) {
      const int64_t j = col0 + lane;
      A run = j < n ? poff_block[j] : A(0);
      for (int r = 0; r < kTile; ++r) {
        f_tile[r][lane] = run;
        run += s_tile[r][lane];
      }
    }
    __syncthreads();

    // 3. Attention logits and online softmax. Rows past N stay empty (m = -inf, l = 0).
    A s[kRowsPerThread];
    tile_dot<kNumChunks>(s, xs, ys, q, p.q_row_stride, row0, k, p.k_row_stride, col0, n,
                         head_dim);
    A prob[kRowsPerThread];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      const int r = warp + kWarps * u;
      const int64_t i = row0 + r, j = col0 + lane;
      const bool valid = i < n && j <= i;
      const A f = f_tile[r][lane];
      const A x = valid ? scale * s[u] - f : neg_inf<A>();
      if (sum_mem && valid) mem_part[u] += f < mem_tau ? f : mem_tau;
      const A tile_max = warp_max(x);
      const A m_new = tile_max > m[u] ? tile_max : m[u];
      // m[u] == -inf means nothing accumulated yet (o and l are 0), so any alpha works; 0
      // avoids evaluating exp(-inf - -inf).
      const A alpha = m[u] == neg_inf<A>() ? A(0) : exp_acc(m[u] - m_new);
      prob[u] = valid ? exp_acc(x - m_new) : A(0);
      l[u] = l[u] * alpha + warp_sum(prob[u]);
      m[u] = m_new;
#pragma unroll
      for (int kc = 0; kc < kNumChunks; ++kc) o[u][kc] *= alpha;
    }

    // 4. O += P V over head-dim chunks; P[r_u][c] lives in lane c of the row's warp.
#pragma unroll
    for (int kc = 0; kc < kNumChunks; ++kc) {
      if (kc * kTile >= head_dim) break;  // uniform
      stage_chunk(ys, v, p.v_row_stride, col0, n, kc * kTile, head_dim);
      __syncthreads();
      for (int c = 0; c < kTile; ++c) {
        const A vv = ys[c][lane];
#pragma unroll
        for (int u = 0; u < kRowsPerThread; ++u)
          o[u][kc] += __shfl_sync(0xffffffffu, prob[u], c) * vv;
      }
      __syncthreads();
    }
  }

  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
           s0 * p.out_row_stride;
  A* lse = static_cast<A*>(p.lse) + stats_offset(p, b, h, p.heads_q, rows);
  if (sum_mem) {
    A* mem = static_cast<A*>(p.mem) + stats_offset(p, b, 0, 1, rows);
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      const A row_sum = warp_sum(mem_part[u]);  // before the row test: all 32 lanes take part
      const int64_t i = row0 + warp + kWarps * u;
      if (lane == 0 && i < n) mem[i] = row_sum;
    }
  }
#pragma unroll
  for (int u = 0; u < kRowsPerThread; ++u) {
    const int64_t i = row0 + warp + kWarps * u;
    if (i >= n) continue;
    // Key 0 is always visible, so l >= exp(0) = 1 for every real row.
    const A inv_l = A(1) / l[u];
#pragma unroll
    for (int kc = 0; kc < kNumChunks; ++kc) {
      const int d = kc * kTile + lane;
      if (d < head_dim) store_elem(out + i * p.out_row_stride + d, o[u][kc] * inv_l);
    }
    if (lane == 0) lse[i] = m[u] + log_acc(l[u]);
  }
}

// Superchunk by superchunk (dispatch.h): its pre-pass from the carry, then its query blocks.
template <typename T, int kNumChunks>
cudaError_t launch_simt_fwd_chunks(const PrefillParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  A* poff = static_cast<A*>(p.workspace);
  double* carry = reinterpret_cast<double*>(static_cast<char*>(p.workspace) + poff_bytes(p));
  if (p.heads_q > 65535 || p.batch > 65535) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaMemsetAsync(carry, 0, carry_bytes(p), stream);
  const int64_t count = num_superchunks(p);
  for (int64_t s = 0; s < count && err == cudaSuccess; ++s) {
    const SuperChunk sc = superchunk(p, s);
    err = launch_selection_prepass<T, kNumChunks>(
        p, poff, carry, sc, s + 1 < count ? CarryMode::kAdvance : CarryMode::kKeep, stream);
    if (err != cudaSuccess) return err;
    const dim3 grid(unsigned(sc.end - sc.begin), unsigned(p.heads_q), unsigned(p.batch));
    err = launch_kernel(simt_fwd_kernel<T, kNumChunks>, grid, dim3(kThreads), 0, stream, p, poff,
                        sc);
  }
  return err;
}

template <typename T>
cudaError_t launch_simt_fwd(const PrefillParams& p, cudaStream_t stream) {
  switch (head_dim_chunks(p.head_dim)) {
    case 1: return launch_simt_fwd_chunks<T, 1>(p, stream);
    case 2: return launch_simt_fwd_chunks<T, 2>(p, stream);
    case 4: return launch_simt_fwd_chunks<T, 4>(p, stream);
    default: return launch_simt_fwd_chunks<T, 8>(p, stream);
  }
}

}  // namespace selattn::cuda
