// Tensor-core prefill forward for bf16/fp16, head dims 32, 64, 96, 128 (flash-attention-2
// style, mma.sync.m16n8k16, fp32 accumulate). Torch-free.
//
// One CTA (8 warps, 128 packed rows) per (query block, group of q heads, batch). PackGQA: the
// CTA's heads h0 .. h0 + H' - 1 (H' = 1, 2 or 4 of one kv group, tc_fwd_heads_per_cta) share
// every K, K_sel, V tile and the F tile (F does not depend on the head): packed row m is query
// row row0 + m % R of head h0 + m / R, R = 128 / H' rows per head (32, 64 or 128). Warp w owns
// packed rows 16w..16w+15, so a warp's rows are 16 consecutive query rows of one head; the
// warps of head h0 (w < R / 16), the "selection warps", compute F and hand it to the others
// through shared memory. 128 packed rows, FlashAttention-2's tile: each K, K_sel, V tile
// staged serves 128 rows, while a warp's registers are those of a 64-row kernel (ptxas sm_90
// counts in bench/results/ptxas_sm90_*). Occupancy: 16 warps per SM at head dim 32, 8 at
// 64-128 (registers; at 128 also shared memory).
// Per key tile of 64 keys (K, K_sel, V staged in padded shared memory):
//   1. Selection warps: A = Q_sel K_sel^T with the tensor cores; S = relu(scale * A) where
//      1 <= j < i. (The other warps wait at the next barrier: letting them start their Q K^T
//      there costs ptxas 13-28 registers, at head dim 32 the second CTA per SM.)
//   2. F = Poff[block] + exclusive cumsum of S down the block's rows: a shuffle scan over the
//      8 row groups of each warp's fragment, then the column totals of the selection warps
//      above (shared memory, up to 7 per column), all in fp32; with H' > 1 written to s_f.
//   3. logits = scale * Q K^T - F, causal mask, online softmax on the fragments.
//   4. O += P V, with P re-packed from the C fragments as the A operand.
// Loads are cp.async, overlapped as in FlashAttention-2 without a second buffer: V of tile j
// is issued before steps 1-3 of tile j, K and K_sel of tile j + 1 right after its Q K^T, so
// each load runs under the math of the step before its first use (4 barriers per tile).
// O is written back through shared memory in 16-byte row vectors.
// With p.mem set (auxiliary memory loss), the selection warps of the CTAs holding head 0 also
// sum min(F, mem_tau) over each row's keys j <= i from the F fragments of step 2 and write
// mem[b][i] once at the end (one CTA per row: no atomics).
// The launcher only picks this path when every row is 16-byte aligned (see tc_fwd_eligible).
// Varlen (p.cu_seqlens): CTAs whose query block starts past their sequence's end exit at once.
#pragma once

#include "cuda/arch.cuh"
#include "cuda/prefill/prepass.cuh"
#include "cuda/tc_mma.cuh"

namespace selattn::cuda {

template <typename T, int kD>
struct TcFwdConfig {
  static_assert(kD % 16 == 0 && kD <= 128, "head dim must be a multiple of 16, at most 128");
  static constexpr int kBlockM = 128;  // packed (query row, head) rows per CTA
  static constexpr int kBlockN = 64;   // keys per tile
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  // CTAs per SM the register allocation must allow (ptxas otherwise spends registers freely).
  // Head dim 32: 2 (16 warps, 128 registers, no spills; unbounded ptxas takes 176). Wider head
  // dims: 1 (8 warps, up to 255 registers): bounding head dim 64 to 2 CTAs spills; which is
  // faster is for a GPU benchmark to say.
  static constexpr int kMinBlocks = kD <= 32 ? 2 : 1;
  // +8 elements (16 bytes) per row: the 8 row addresses of an ldmatrix hit distinct banks.
  static constexpr int kStride = kD + 8;
  // F of the selection warps' rows for the other heads: at most kBlockM / 2 rows (H' >= 2).
  static constexpr int kFStride = kBlockN + 8;
  static constexpr size_t kSmemBytes =
      size_t(2 * kBlockM + 3 * kBlockN) * kStride * sizeof(T) +
      kWarps * kBlockN * sizeof(float) + size_t(kBlockM / 2) * kFStride * sizeof(float);
};

// Q heads per CTA of the tensor-core forward (PackGQA): the largest of 4, 2, 1 dividing the
// GQA group size. The grid keeps N * Hq / 128 CTAs whatever it is.
inline int tc_fwd_heads_per_cta(const PrefillParams& p) {
  const int64_t group = p.heads_q / p.heads_kv;
  return group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;
}

template <typename T, int kD>
__global__ void __launch_bounds__(TcFwdConfig<T, kD>::kThreads, TcFwdConfig<T, kD>::kMinBlocks)
    tc_fwd_kernel(const PrefillParams p, const float* __restrict__ poff, const SuperChunk sc,
                  const int heads_per_cta) {
  using Cfg = TcFwdConfig<T, kD>;
  constexpr int kBM = Cfg::kBlockM, kBN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kFStride = Cfg::kFStride, kThr = Cfg::kThreads;
  SELATTN_DYNAMIC_SHARED(smem_raw);
  T* s_q = reinterpret_cast<T*>(smem_raw);  // packed rows: head h0 + m / R, row m % R
  T* s_qsel = s_q + kBM * kStride;           // R rows
  T* s_k = s_qsel + kBM * kStride;
  T* s_ksel = s_k + kBN * kStride;
  T* s_v = s_ksel + kBN * kStride;
  float* s_warp_tot = reinterpret_cast<float*>(s_v + kBN * kStride);  // [kWarps][kBN]
  float* s_f = s_warp_tot + Cfg::kWarps * kBN;                         // [R][kFStride]

  const int heads = heads_per_cta;
  const int rows_per_head = kBM / heads;  // R
  // R-row query blocks of the superchunk (its begin is a multiple of 4 blocks, 128 rows:
  // dispatch.h); longest rows first.
  const int64_t qb = ceil_div(sc.end * kSelBlockRows, rows_per_head) - 1 - blockIdx.x;
  const int64_t h0 = int64_t(blockIdx.y) * heads, b = blockIdx.z;
  const int64_t hk = h0 / (p.heads_q / p.heads_kv);
  const int64_t row0 = qb * rows_per_head;
  const SeqRows rows = seq_rows(p, b);
  const int64_t n = rows.n;
  if (row0 >= n) return;  // past this sequence (varlen): uniform, before any barrier
  const int64_t last_row = row0 + rows_per_head - 1 < n - 1 ? row0 + rows_per_head - 1 : n - 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const float scale = float(p.scale);
  const int wrow = warp * 16 % rows_per_head;  // this warp's first row, relative to row0
  const bool sel_warp = warp * 16 < rows_per_head;  // head h0's warps compute F (uniform)
  const int64_t i_lo = row0 + wrow + g, i_hi = i_lo + 8;  // this thread's two rows
  // Uniform per warp: the selection warps of the CTAs holding head 0.
  const bool sum_mem = h0 == 0 && sel_warp && p.mem != nullptr && p.mem_tau > 0;
  const float mem_tau = float(p.mem_tau);

  const auto [q, k, v, q_sel, k_sel] = seq_inputs<T>(p, b, h0, hk, rows);
  // Poff is kept per 32-row block; the R-row block starting at row0 is block row0 / 32.
  const float* poff_block =
      poff + (b * sc.stride + row0 / kSelBlockRows - sc.begin) * p.seqlen;

  // Q (32 packed rows at a time, each within one head), Q_sel and the first key tile's K,
  // K_sel: the first cp.async group.
  for (int c = 0; c < kBM / 32; ++c) {
    const int m = c * 32;
    const T* q_head = q + (m / rows_per_head) * p.q_head_stride;
    tc_load_rows_async<T, kD, 32, kThr>(s_q + m * kStride, q_head, p.q_row_stride,
                                        row0 + m % rows_per_head, n);
  }
  for (int m = 0; m < rows_per_head; m += 32)
    tc_load_rows_async<T, kD, 32, kThr>(s_qsel + m * kStride, q_sel, p.q_sel_row_stride,
                                        row0 + m, n);
  tc_load_rows_async<T, kD, kBN, kThr>(s_k, k, p.k_row_stride, 0, n);
  tc_load_rows_async<T, kD, kBN, kThr>(s_ksel, k_sel, p.k_sel_row_stride, 0, n);
  cp_async_commit();

  float o[kD / 8][4];
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
    for (int c = 0; c < 4; ++c) o[dt][c] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows i_lo, i_hi
  float mem_part[2] = {0.f, 0.f};  // this lane's share of sum_j min(F, mem_tau), rows i_lo, i_hi

  for (int64_t col0 = 0; col0 <= last_row; col0 += kBN) {
    cp_async_wait<0>();  // this thread's copies of the tile's K, K_sel have landed
    __syncthreads();     // ... everyone's; the previous tile's P V is done with s_v, its
                         // softmax with s_f
    // V lands while the selection tile, F and Q K^T are computed (FlashAttention-2's order).
    tc_load_rows_async<T, kD, kBN, kThr>(s_v, v, p.v_row_stride, col0, n);
    cp_async_commit();

    float s[8][4];  // logits, C fragments (rows i_lo: c = 0, 1; rows i_hi: c = 2, 3)
    float f[8][4];  // F, the same fragment positions
    if (sel_warp) {
      // 1-2. Selection tile, then F in place: f[nt][c] for (row, key) = C-fragment element.
      tc_gemm_xyt<T, kD>(f, s_qsel, s_ksel, warp, lane);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t j = col0 + nt * 8 + 2 * t + c;
          const float s_lo = selection_score(scale * f[nt][c], i_lo, j, n);
          const float s_hi = selection_score(scale * f[nt][2 + c], i_hi, j, n);
          // Inclusive scan over the row groups g = 0..7 (lanes 4 apart share t, i.e. the key).
          float inc_lo = s_lo, inc_hi = s_hi;
#pragma unroll
          for (int off = 1; off < 8; off <<= 1) {
            const float y_lo = __shfl_up_sync(0xffffffffu, inc_lo, 4 * off);
            const float y_hi = __shfl_up_sync(0xffffffffu, inc_hi, 4 * off);
            if (g >= off) inc_lo += y_lo, inc_hi += y_hi;
          }
          const float tot_lo = __shfl_sync(0xffffffffu, inc_lo, 28 + t);  // rows 0..7 of the warp
          const float tot_hi = __shfl_sync(0xffffffffu, inc_hi, 28 + t);  // rows 8..15
          float exc_lo = __shfl_up_sync(0xffffffffu, inc_lo, 4);
          float exc_hi = __shfl_up_sync(0xffffffffu, inc_hi, 4);
          if (g == 0) exc_lo = 0.f, exc_hi = 0.f;
          f[nt][c] = exc_lo;
          f[nt][2 + c] = tot_lo + exc_hi;
          if (g == 0) s_warp_tot[warp * kBN + nt * 8 + 2 * t + c] = tot_lo + tot_hi;
        }
      }
    }
    __syncthreads();  // the selection warps' column totals
    if (sel_warp) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = nt * 8 + 2 * t + c;
          const int64_t j = col0 + col;
          float base = j < n ? poff_block[j] : 0.f;
          for (int w = 0; w < warp; ++w) base += s_warp_tot[w * kBN + col];
          f[nt][c] += base;
          f[nt][2 + c] += base;
        }
      }
      if (heads > 1) {  // for the other heads' warps: F of rows wrow + g (+ 8)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int col = nt * 8 + 2 * t;
          *reinterpret_cast<float2*>(s_f + (wrow + g) * kFStride + col) =
              make_float2(f[nt][0], f[nt][1]);
          *reinterpret_cast<float2*>(s_f + (wrow + g + 8) * kFStride + col) =
              make_float2(f[nt][2], f[nt][3]);
        }
      }
      if (sum_mem) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int64_t i = c < 2 ? i_lo : i_hi;
            const int64_t j = col0 + nt * 8 + 2 * t + (c % 2);
            if (i < n && j <= i) mem_part[c / 2] += fminf(f[nt][c], mem_tau);
          }
        }
      }
    }
    // 3. Logits.
    tc_gemm_xyt<T, kD>(s, s_q, s_k, warp, lane);
    __syncthreads();  // every warp is done with s_k, s_ksel and s_warp_tot; s_f is written
    // The next tile's K, K_sel land during the softmax and P V.
    if (col0 + kBN <= last_row) {
      tc_load_rows_async<T, kD, kBN, kThr>(s_k, k, p.k_row_stride, col0 + kBN, n);
      tc_load_rows_async<T, kD, kBN, kThr>(s_ksel, k_sel, p.k_sel_row_stride, col0 + kBN, n);
    }
    cp_async_commit();  // possibly empty: the group count stays uniform
    if (!sel_warp) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int col = nt * 8 + 2 * t;
        const float2 lo = *reinterpret_cast<const float2*>(s_f + (wrow + g) * kFStride + col);
        const float2 hi = *reinterpret_cast<const float2*>(s_f + (wrow + g + 8) * kFStride + col);
        f[nt][0] = lo.x, f[nt][1] = lo.y, f[nt][2] = hi.x, f[nt][3] = hi.y;
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t i = c < 2 ? i_lo : i_hi;
        const int64_t j = col0 + nt * 8 + 2 * t + (c % 2);
        const bool valid = i < n && j <= i;
        s[nt][c] = valid ? scale * s[nt][c] - f[nt][c] : -INFINITY;
      }
    }
    tc_online_softmax(s, m, l, o);

    cp_async_wait<1>();  // this thread's V copies have landed (the next K may be in flight)
    __syncthreads();     // ... everyone's
    // 4. O += P V.
    tc_accumulate_xt_y<T, kD>(o, s, s_v, lane);
  }
  cp_async_wait<0>();  // the last (empty) group

  // The sequence's rows again (not kept live across the key loop: fewer registers there).
  const SeqRows rows_out = seq_rows(p, b);
  const int64_t h = h0 + warp * 16 / rows_per_head;  // this warp's head
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
           rows_out.start * p.out_row_stride;
  float* lse = static_cast<float*>(p.lse) + stats_offset(p, b, h, p.heads_q, rows_out);
  if (sum_mem) {
    float* mem = static_cast<float*>(p.mem) + stats_offset(p, b, 0, 1, rows_out);
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      // The four lanes t of a row group hold the row's keys; all 32 lanes shuffle.
      float row_sum = mem_part[rh];
      row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
      row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 2);
      const int64_t i = rh == 0 ? i_lo : i_hi;
      if (t == 0 && i < n) mem[i] = row_sum;
    }
  }
  // O leaves through this warp's own 16 rows of s_q (no other warp reads them), so each
  // global store is one 16-byte vector of a row instead of a 4-byte pair per lane.
  T* s_o = s_q + warp * 16 * kStride;
  __syncwarp();  // every lane's last reads of these rows (the Q K^T fragments) are done
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int64_t i = rh == 0 ? i_lo : i_hi;
    // Key 0 is always visible, so l >= 1 on every row < n; rows past n are not stored.
    const float inv_l = i < n ? 1.f / l[rh] : 0.f;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt)
      *reinterpret_cast<uint32_t*>(s_o + (g + 8 * rh) * kStride + dt * 8 + 2 * t) =
          pack2<T>(o[dt][2 * rh] * inv_l, o[dt][2 * rh + 1] * inv_l);
    if (t == 0 && i < n) lse[i] = m[rh] + __logf(l[rh]);
  }
  __syncwarp();
  for (int e = lane; e < 16 * (kD / 8); e += 32) {
    const int r = e / (kD / 8), c = (e % (kD / 8)) * 8;
    const int64_t i = row0 + wrow + r;
    if (i < n)
      *reinterpret_cast<uint4*>(out + i * p.out_row_stride + c) =
          *reinterpret_cast<const uint4*>(s_o + r * kStride + c);
  }
}

template <typename T, int kD>
cudaError_t launch_tc_fwd_hdim(const PrefillParams& p, cudaStream_t stream) {
  using Cfg = TcFwdConfig<T, kD>;
  float* poff = static_cast<float*>(p.workspace);
  double* carry = reinterpret_cast<double*>(static_cast<char*>(p.workspace) + poff_bytes(p));
  constexpr int kChunks = (kD + kTile - 1) / kTile;
  if (p.heads_q > 65535 || p.batch > 65535) return cudaErrorInvalidConfiguration;
  auto kernel = tc_fwd_kernel<T, kD>;
  const int heads_per_cta = tc_fwd_heads_per_cta(p);
  cudaError_t err = cudaSuccess;
  if (Cfg::kSmemBytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(Cfg::kSmemBytes));
    if (err != cudaSuccess) return err;
  }
  err = cudaMemsetAsync(carry, 0, carry_bytes(p), stream);
  // Superchunk by superchunk (dispatch.h): its pre-pass from the carry, then its query blocks.
  const int64_t count = num_superchunks(p);
  for (int64_t s = 0; s < count && err == cudaSuccess; ++s) {
    const SuperChunk sc = superchunk(p, s);
    err = launch_selection_prepass<T, kChunks, kD>(
        p, poff, carry, sc, s + 1 < count ? CarryMode::kAdvance : CarryMode::kKeep, stream);
    if (err != cudaSuccess) return err;
    const int64_t rows_begin = sc.begin * kSelBlockRows;
    const int64_t rows_end = p.seqlen < sc.end * kSelBlockRows ? p.seqlen : sc.end * kSelBlockRows;
    const int rows_per_head = Cfg::kBlockM / heads_per_cta;
    const dim3 grid(unsigned(ceil_div(rows_end, rows_per_head) - rows_begin / rows_per_head),
                    unsigned(p.heads_q / heads_per_cta), unsigned(p.batch));
    err = launch_kernel(kernel, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p, poff, sc,
                        heads_per_cta);
  }
  return err;
}

}  // namespace selattn::cuda
