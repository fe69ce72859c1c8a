// Tensor-core prefill forward for bf16/fp16, head dims 32, 64, 96, 128 (flash-attention-2
// style, mma.sync.m16n8k16, fp32 accumulate). Torch-free.
//
// One CTA (8 warps) per (query block of 128 rows, q head, batch); warp w owns rows
// 16w..16w+15. 128 rows, FlashAttention-2's tile, at every head dim: each K, K_sel, V tile
// staged serves twice the rows of a 64-row tile (half the L2 -> shared traffic and cp.async
// work per row), while a warp's registers are those of the 64-row kernel (a warp still owns
// 16 rows; ptxas sm_90 counts in bench/results/ptxas_sm90_*). Occupancy stays at 8 warps per
// SM for head dims 64-128 (registers, and shared memory at 128) and 16 at 32.
// Per key tile of 64 keys (K, K_sel, V staged in padded shared memory):
//   1. A = Q_sel K_sel^T with the tensor cores; S = relu(scale * A) where 1 <= j < i.
//   2. F = Poff[block] + exclusive cumsum of S down the block's rows: a shuffle scan over the
//      8 row groups of each warp's fragment, then the column totals of the warps above (shared
//      memory, up to 7 per column), all in fp32.
//   3. logits = scale * Q K^T - F, causal mask, online softmax on the fragments.
//   4. O += P V, with P re-packed from the C fragments as the A operand.
// Loads are cp.async, overlapped as in FlashAttention-2 without a second buffer: V of tile j
// is issued before steps 1-3 of tile j, K and K_sel of tile j + 1 right after its Q K^T, so
// each load runs under the math of the step before its first use (4 barriers per tile).
// O is written back through shared memory in 16-byte row vectors.
// With p.mem set (auxiliary memory loss), the head-0 CTAs also sum min(F, mem_tau) over each
// row's keys j <= i from the F fragments of step 2 and write mem[b][i] once at the end (one
// head-0 CTA per row: no atomics).
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
  static constexpr int kBlockM = 128;  // query rows per CTA
  static constexpr int kBlockN = 64;  // keys per tile
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  // CTAs per SM the register allocation must allow (ptxas otherwise spends registers freely).
  // Head dim 32: 2 (16 warps, at most 128 registers; unbounded ptxas takes ~150). Wider head
  // dims: 1 (8 warps, up to 255 registers): bounding head dim 64 to 2 CTAs (128 registers)
  // spills; which is faster is for a GPU benchmark to say.
  static constexpr int kMinBlocks = kD <= 32 ? 2 : 1;
  // +8 elements (16 bytes) per row: the 8 row addresses of an ldmatrix hit distinct banks.
  static constexpr int kStride = kD + 8;
  static constexpr size_t kSmemBytes =
      size_t(2 * kBlockM + 3 * kBlockN) * kStride * sizeof(T) + kWarps * kBlockN * sizeof(float);
};

template <typename T, int kD>
__global__ void __launch_bounds__(TcFwdConfig<T, kD>::kThreads, TcFwdConfig<T, kD>::kMinBlocks)
    tc_fwd_kernel(const PrefillParams p, const float* __restrict__ poff, const SuperChunk sc) {
  using Cfg = TcFwdConfig<T, kD>;
  constexpr int kBM = Cfg::kBlockM, kBN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kThr = Cfg::kThreads;
  SELATTN_DYNAMIC_SHARED(smem_raw);
  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_qsel = s_q + kBM * kStride;
  T* s_k = s_qsel + kBM * kStride;
  T* s_ksel = s_k + kBN * kStride;
  T* s_v = s_ksel + kBN * kStride;
  float* s_warp_tot = reinterpret_cast<float*>(s_v + kBN * kStride);  // [kWarps][kBN]

  // 128-row blocks of the superchunk (its begin is a multiple of 4 blocks: dispatch.h);
  // longest rows first.
  const int64_t qb = ceil_div(sc.end * kSelBlockRows, kBM) - 1 - blockIdx.x;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const int64_t row0 = qb * kBM;
  const SeqRows rows = seq_rows(p, b);
  const int64_t n = rows.n;
  if (row0 >= n) return;  // past this sequence (varlen): uniform, before any barrier
  const int64_t last_row = row0 + kBM - 1 < n - 1 ? row0 + kBM - 1 : n - 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const float scale = float(p.scale);
  const int64_t i_lo = row0 + warp * 16 + g, i_hi = i_lo + 8;  // this thread's two rows
  const bool sum_mem = h == 0 && p.mem != nullptr && p.mem_tau > 0;  // uniform per CTA
  const float mem_tau = float(p.mem_tau);

  const auto [q, k, v, q_sel, k_sel] = seq_inputs<T>(p, b, h, hk, rows);
  // Poff is kept per 32-row block; the 128-row block starting at row0 is block row0 / 32.
  const float* poff_block =
      poff + (b * sc.stride + row0 / kSelBlockRows - sc.begin) * p.seqlen;

  // Q, Q_sel and the first key tile's K, K_sel: the first cp.async group.
  tc_load_rows_async<T, kD, kBM, kThr>(s_q, q, p.q_row_stride, row0, n);
  tc_load_rows_async<T, kD, kBM, kThr>(s_qsel, q_sel, p.q_sel_row_stride, row0, n);
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
    __syncthreads();     // ... everyone's; and the previous tile's P V is done with s_v
    // V lands while the selection tile, F and Q K^T are computed (FlashAttention-2's order).
    tc_load_rows_async<T, kD, kBN, kThr>(s_v, v, p.v_row_stride, col0, n);
    cp_async_commit();

    // 1-2. Selection tile, then F in place: f[nt][c] for (row, key) = C-fragment element.
    float f[8][4];
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
    __syncthreads();
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

    // 3. Logits and online softmax (rows i_lo: c = 0, 1; rows i_hi: c = 2, 3).
    float s[8][4];
    tc_gemm_xyt<T, kD>(s, s_q, s_k, warp, lane);
    __syncthreads();  // every warp is done with s_k, s_ksel and s_warp_tot of this tile
    // The next tile's K, K_sel land during the softmax and P V.
    if (col0 + kBN <= last_row) {
      tc_load_rows_async<T, kD, kBN, kThr>(s_k, k, p.k_row_stride, col0 + kBN, n);
      tc_load_rows_async<T, kD, kBN, kThr>(s_ksel, k_sel, p.k_sel_row_stride, col0 + kBN, n);
    }
    cp_async_commit();  // possibly empty: the group count stays uniform
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
    const int64_t i = row0 + warp * 16 + r;
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
    const dim3 grid(unsigned(ceil_div(rows_end, Cfg::kBlockM) - rows_begin / Cfg::kBlockM),
                    unsigned(p.heads_q), unsigned(p.batch));
    err = launch_kernel(kernel, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p, poff, sc);
  }
  return err;
}

}  // namespace selattn::cuda
