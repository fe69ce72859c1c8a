// Tensor-core prefill backward for bf16/fp16, head dims 32, 64, 96, 128 (DESIGN §2 with
// mma.sync.m16n8k16, fp32 accumulate). Torch-free. The default backward for these dtypes and
// head dims (SELATTN_CUDA_TC_BWD=0 opts out, see prefill/launch.cu); the SIMT backward serves
// fp32/fp64, other head dims, misaligned rows, and GPUs with too little shared memory.
//
// One CTA (4 warps) per (key block of 64 keys, q head, batch) walks the 64-row query blocks
// from the last down to its own. Warp w owns keys 16w..16w+15 and computes *transposed* tiles
// (keys x 64 query rows) as 8 C fragments, so thread (g, t) holds keys g and g+8 and query rows
// nt*8 + 2t (+1): F's cumsum and dS's suffix sum over query rows then run along the thread's own
// fragment columns (a 4-lane shuffle scan per 8-row slice plus a carry across slices), with no
// cross-warp step. Per tile:
//   A^T = Ksel Qsel^T -> S^T (mask bits kept), F^T = Poff + exclusive cumsum over rows
//   P^T = exp(scale K Q^T - F^T - lse),  dP^T = V dO^T,  dL^T = P^T (dP^T - Dl)
//   dV += P^T dO,  dK += dL^T Q                          (registers, over all query blocks)
//   dA^T = [S^T > 0] * -(suffix sum of dL^T over later rows; the running per-key suffix from
//          later query blocks is a register)
//   dKsel += dA^T Qsel                                   (fp32 accumulator in shared memory)
//   dL^T, dA^T -> shared memory (bf16/fp16), then with warps over query rows:
//   dQ += dL K,  dQsel += dA Ksel                        (fp32 atomics into the workspace)
// This exact source also runs on the CPU (csrc/cuda/emulation, tools/cuda_emulation/emulated.py).
// Memory loss (p.dmem): in head-0 CTAs only (once per batch element), the suffix sum behind dA
// also takes -dmem[i] * [F[i][j] < mem_tau] for j <= i (dF's extra term), from a bit mask of
// the F tests taken while F^T is still live; dK and dQ use plain dL.
// Loads are cp.async: K, K_sel, V with the first query block; each later block's Q, Q_sel, dO
// are issued once the block before is done with them and land during its dQ atomics.
// Varlen (p.cu_seqlens): CTAs whose key block starts past their sequence's end exit at once.
#pragma once

#include "cuda/arch.cuh"
#include "cuda/prefill/simt_bwd.cuh"
#include "cuda/prefill/tc_fwd.cuh"

namespace selattn::cuda {

template <typename T, int kD>
struct TcBwdConfig {
  static_assert(kD % 16 == 0 && kD <= 128, "head dim must be a multiple of 16, at most 128");
  static constexpr int kBlockM = 64;  // query rows per tile
  static constexpr int kBlockN = 64;  // keys per CTA
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStride = kD + 8;        // q/k/v-like tiles (T), conflict-free ldmatrix
  static constexpr int kPStride = kBlockM + 8;  // dL^T, dA^T tiles (T), [key][row]
  static constexpr int kAccStride = kD + 8;     // dKsel (and dK) accumulators (float), [key][d]
  // From head dim 96 on, dV + dK register accumulators (96+ floats per thread) spill; dK then
  // accumulates in shared memory like dKsel.
  static constexpr bool kDkInSmem = kD > 64;
  static constexpr size_t kSmemBytes =
      size_t(3 * kBlockN + 3 * kBlockM) * kStride * sizeof(T) +
      size_t(2 * kBlockN) * kPStride * sizeof(T) + size_t(3 * kBlockM) * sizeof(float) +
      size_t(kDkInSmem ? 2 : 1) * kBlockN * kAccStride * sizeof(float) +
      size_t(2 * 32 * kThreads) * sizeof(float);  // s_ft, s_dsum
};

// s_acc (64 keys x kD floats, [key][kD + 8]) += X^T Y for this warp's 16 keys; X^T given as
// 8 C fragments (16 keys x 64 rows), Y (64 rows x kD) padded. Each (key, d) element belongs
// to exactly one thread, so the read-modify-write needs no barrier.
template <typename T, int kD>
__device__ __forceinline__ void tc_accumulate_xt_y_smem(float* s_acc, const float (&x)[8][4],
                                                        const T* s_y, int warp, int lane) {
  constexpr int kStride = kD + 8, kAccStride = kD + 8;
  const int g = lane / 4, t = lane % 4;
  uint32_t a[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    a[kk][0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);
    a[kk][1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);
    a[kk][2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[kk][3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
  }
#pragma unroll 1  // acc is per-dn: a rolled loop keeps the ldmatrix results from piling up
  for (int dn = 0; dn < kD / 16; ++dn) {
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, s_y + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * kStride +
                               dn * 16 + 8 * (lane / 16));
      mma_16816<T>(acc[0], a[kk], b[0], b[1]);
      mma_16816<T>(acc[1], a[kk], b[2], b[3]);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int d = (2 * dn + half) * 8 + 2 * t;
      const int kl = warp * 16 + g;
      float2* lo = reinterpret_cast<float2*>(s_acc + kl * kAccStride + d);
      float2* hi = reinterpret_cast<float2*>(s_acc + (kl + 8) * kAccStride + d);
      float2 u = *lo, w = *hi;
      u.x += acc[half][0], u.y += acc[half][1];
      w.x += acc[half][2], w.y += acc[half][3];
      *lo = u, *hi = w;
    }
  }
}

// dst[row0 + warp rows][:] += scale * X Y over the 64 keys, X given transposed in shared
// memory ([key][row], kPStride), Y (64 keys x kD) padded; fp32 atomics, rows >= n skipped.
template <typename T, int kD>
__device__ __forceinline__ void tc_rows_times_keys_atomic(const T* s_xt, const T* s_y, float* dst,
                                                          int64_t row0, int64_t n, float scale,
                                                          int warp, int lane) {
  constexpr int kStride = kD + 8, kPStride = 64 + 8;
  const int g = lane / 4, t = lane % 4;
#pragma unroll 1  // acc is per-dn: a rolled loop keeps the ldmatrix results from piling up
  for (int dn = 0; dn < kD / 16; ++dn) {
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4], b[4];
      // A = X (rows x keys) from X^T stored [key][row]: transposed 8x8 loads.
      ldmatrix_x4_trans(a, s_xt + (kk * 16 + (lane % 8) + 8 * (lane / 16)) * kPStride +
                               warp * 16 + 8 * ((lane / 8) % 2));
      ldmatrix_x4_trans(b, s_y + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * kStride +
                               dn * 16 + 8 * (lane / 16));
      mma_16816<T>(acc[0], a, b[0], b[1]);
      mma_16816<T>(acc[1], a, b[2], b[3]);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int d = (2 * dn + half) * 8 + 2 * t;
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        const int64_t i = row0 + warp * 16 + g + 8 * rh;
        if (i >= n) continue;
        const float v0 = acc[half][2 * rh], v1 = acc[half][2 * rh + 1];
        if (v0 != 0.f) atomicAdd(dst + i * kD + d, scale * v0);
        if (v1 != 0.f) atomicAdd(dst + i * kD + d + 1, scale * v1);
      }
    }
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(TcBwdConfig<T, kD>::kThreads, 1)
    tc_bwd_kernel(const PrefillParams p, const BwdAccum<float> ws, const SuperChunk sc,
                  const int heads_per_cta) {
  using Cfg = TcBwdConfig<T, kD>;
  constexpr int kBM = Cfg::kBlockM, kBN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kPStride = Cfg::kPStride, kAccStride = Cfg::kAccStride, kThr = Cfg::kThreads;
  SELATTN_DYNAMIC_SHARED(smem_raw);
  T* s_k = reinterpret_cast<T*>(smem_raw);
  T* s_ksel = s_k + kBN * kStride;
  T* s_v = s_ksel + kBN * kStride;
  T* s_q = s_v + kBN * kStride;
  T* s_qsel = s_q + kBM * kStride;
  T* s_do = s_qsel + kBM * kStride;
  T* s_dlt = s_do + kBM * kStride;     // dL^T [key][row]
  T* s_dat = s_dlt + kBN * kPStride;   // dA^T [key][row]
  float* s_lse = reinterpret_cast<float*>(s_dat + kBN * kPStride);
  float* s_dl = s_lse + kBM;
  float* s_dmem = s_dl + kBM;          // dmem of the block's rows (memory loss, head 0 only)
  float* s_dks = s_dmem + kBM;         // dKsel accumulator [key][d]
  constexpr bool kDkInSmem = Cfg::kDkInSmem;
  float* s_dk = s_dks + kBN * kAccStride;  // dK accumulator (only when Cfg::kDkInSmem)
  // Per-thread fragment stores, [element][thread] (conflict-free): F^T of the block, read by
  // the CTA's later heads; the sum of dL^T over the heads before the last.
  float* s_ft = s_dk + (kDkInSmem ? kBN * kAccStride : 0);
  float* s_dsum = s_ft + 32 * kThr;

  // 64-row query blocks of the superchunk (its begin is a multiple of 4 blocks: dispatch.h).
  const int64_t sc_qb_end = ceil_div(sc.end * kSelBlockRows, kBM), qb_begin = sc.begin / 2;
  const int64_t kb = blockIdx.x;  // small kb = most query blocks: first, for tail balance
  const int heads = heads_per_cta;  // q heads h0 .. h0 + heads - 1, all of kv head hk
  const int64_t h0 = int64_t(blockIdx.y) * heads, b = blockIdx.z;
  const int64_t hk = h0 / (p.heads_q / p.heads_kv);
  const int64_t col0 = kb * kBN;
  const SeqRows rows = seq_rows(p, b);
  const int64_t n = rows.n;
  if (col0 >= n) return;  // past this sequence (varlen): uniform, before any barrier
  const int64_t nqb = ceil_div(n, kBM);  // this sequence's query blocks
  const int64_t qb_end = sc_qb_end < nqb ? sc_qb_end : nqb;
  const int64_t qb_stop = kb > qb_begin ? kb : qb_begin;  // the walk: qb_end - 1 down to this
  // Varlen: a sequence that ends before this superchunk has no query block in it; this CTA
  // would add nothing (and its shared accumulators are only set up inside the walk). Uniform.
  if (qb_end <= qb_stop) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const float scale = float(p.scale);
  const int64_t key_lo = col0 + warp * 16 + g, key_hi = key_lo + 8;  // this thread's two keys
  // dF's memory term is added once per batch element: by the CTA holding head 0. Uniform.
  const bool add_mem = h0 == 0 && p.dmem != nullptr && p.mem_tau > 0;
  const float mem_tau = float(p.mem_tau);
  const float* dmem =
      add_mem ? static_cast<const float*>(p.dmem) + stats_offset(p, b, 0, 1, rows) : nullptr;

  const auto [q0, k, v, q_sel, k_sel] = seq_inputs<T>(p, b, h0, hk, rows);

  // The key-side tiles and the first (last-row) query block of head h0: one cp.async group.
  // Each later (head, query block) is issued during the dQ atomics before it (see below).
  tc_load_rows_async<T, kD, kBN, kThr>(s_k, k, p.k_row_stride, col0, n);
  tc_load_rows_async<T, kD, kBN, kThr>(s_ksel, k_sel, p.k_sel_row_stride, col0, n);
  tc_load_rows_async<T, kD, kBN, kThr>(s_v, v, p.v_row_stride, col0, n);
  tc_load_rows_async<T, kD, kBM, kThr>(s_q, q0, p.q_row_stride, (qb_end - 1) * kBM, n);
  tc_load_rows_async<T, kD, kBM, kThr>(s_qsel, q_sel, p.q_sel_row_stride, (qb_end - 1) * kBM, n);
  tc_load_rows_async<T, kD, kBM, kThr>(s_do, seq_dout<T>(p, b, h0, rows), p.dout_row_stride,
                                       (qb_end - 1) * kBM, n);
  cp_async_commit();
  constexpr int kAccFloats = (kDkInSmem ? 2 : 1) * kBN * kAccStride;  // s_dks, then s_dk
  for (int e = threadIdx.x; e < kAccFloats; e += kThr) s_dks[e] = 0.f;

  constexpr int kDkHeld = kDkInSmem ? 1 : kD / 8;  // register dK fragments (unused if in smem)
  float dv_acc[kD / 8][4], dk_acc[kDkHeld][4];  // summed over the CTA's heads (one kv head)
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
    for (int c = 0; c < 4; ++c) dv_acc[dt][c] = 0.f;
#pragma unroll
  for (int dt = 0; dt < kDkHeld; ++dt)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk_acc[dt][c] = 0.f;
  // Per key: sum of dL over the CTA's heads and the query blocks already walked (earlier
  // launches' superchunks included), kept in head h0's slot; the four lanes t of a row group
  // hold the same value.
  float* dsuf = ws.dsuf + stats_offset(p, b, h0, p.heads_q, rows);
  float dl_suffix[2] = {key_lo < n ? dsuf[key_lo] : 0.f, key_hi < n ? dsuf[key_hi] : 0.f};

  for (int64_t qb = qb_end - 1; qb >= qb_stop; --qb) {
    const int64_t row0 = qb * kBM;
    // 32-bit row arithmetic relative to the block (fewer live registers than int64 indices):
    // query row i = row0 + rl is real when rl < rows_here; key j relates to it via j - row0.
    const int rows_here = int(n - row0 < kBM ? n - row0 : kBM);
    const int key_rel[2] = {int(key_lo - row0), int(key_hi - row0)};
    uint32_t positive = 0;   // bit nt*4 + c: S > 0 (the relu and structural mask of dA)
    uint32_t below_tau = 0;  // bit nt*4 + c: j <= i < n and F < mem_tau (add_mem only)

    for (int hi = 0; hi < heads; ++hi) {
      const int64_t h = h0 + hi;
      const BwdRows<float> hr = bwd_rows(p, ws, b, h, hk, rows, kD);  // lse, dl, dq of head h
      cp_async_wait<0>();  // this thread's copies of the head's Q, dO (and Q_sel) have landed
      // (The previous head's readers of s_lse, s_dl passed the barrier before its dQ.)
      for (int r = threadIdx.x; r < kBM; r += kThr) {
        s_lse[r] = row0 + r < n ? hr.lse[row0 + r] : 0.f;
        s_dl[r] = row0 + r < n ? hr.dl[row0 + r] : 0.f;
        if (add_mem && hi == 0) s_dmem[r] = row0 + r < n ? dmem[row0 + r] : 0.f;
      }
      __syncthreads();

      // F^T, once per block (F does not depend on the head). Fragment element c of n-tile
      // nt: key (c < 2 ? key_lo : key_hi), query row row0 + nt*8 + 2t + (c & 1).
      float f[8][4];
      if (hi == 0) {
        // Poff is kept per 32-row block; this 64-row block starts at block row0 / 32.
        const float* poff_block =
            ws.poff + (b * sc.stride + row0 / kSelBlockRows - sc.begin) * p.seqlen;
        tc_gemm_xyt<T, kD, true>(f, s_ksel, s_qsel, warp, lane);
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
          const int64_t key = rh == 0 ? key_lo : key_hi;
          float carry = key < n ? poff_block[key] : 0.f;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            const int rl0 = nt * 8 + 2 * t;
            // S[i][j] = relu(a) where 1 <= j < i < n (selection_score, block-relative).
            const bool key_ok = key >= 1;
            const float a0 = scale * f[nt][2 * rh], a1 = scale * f[nt][2 * rh + 1];
            const float x0 =
                (key_ok && rl0 < rows_here && key_rel[rh] < rl0 && a0 > 0.f) ? a0 : 0.f;
            const float x1 =
                (key_ok && rl0 + 1 < rows_here && key_rel[rh] < rl0 + 1 && a1 > 0.f) ? a1 : 0.f;
            positive |= uint32_t(x0 > 0.f) << (nt * 4 + 2 * rh);
            positive |= uint32_t(x1 > 0.f) << (nt * 4 + 2 * rh + 1);
            // Exclusive scan of the 8 rows of this slice: 2 per lane, over the 4 lanes t.
            const float pair = x0 + x1;
            float inc = pair;
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
              const float y = __shfl_up_sync(0xffffffffu, inc, off);
              if (t >= off) inc += y;
            }
            float exc = __shfl_up_sync(0xffffffffu, inc, 1);
            if (t == 0) exc = 0.f;
            f[nt][2 * rh] = carry + exc;
            f[nt][2 * rh + 1] = carry + exc + x0;
            carry += __shfl_sync(0xffffffffu, inc, (lane & ~3) + 3);  // the slice's total
          }
        }
        if (heads > 1) {
#pragma unroll
          for (int e = 0; e < 32; ++e) s_ft[e * kThr + threadIdx.x] = f[e / 4][e % 4];
        }
      } else {
#pragma unroll
        for (int e = 0; e < 32; ++e) f[e / 4][e % 4] = s_ft[e * kThr + threadIdx.x];
      }

      // P^T (F^T is dead after this, before the next GEMM: fewer live registers), dV += P^T dO.
      float pt[8][4];
      tc_gemm_xyt<T, kD, true>(pt, s_k, s_q, warp, lane);
      uint32_t valid_bits = 0;  // bit nt*4 + c: j <= i < n
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int rl = nt * 8 + 2 * t + (c & 1);
          const bool valid = rl < rows_here && key_rel[c / 2] <= rl;  // j <= i < n
          valid_bits |= uint32_t(valid) << (nt * 4 + c);
          if (hi == 0)
            below_tau |= uint32_t(add_mem && valid && f[nt][c] < mem_tau) << (nt * 4 + c);
          pt[nt][c] = valid ? __expf(scale * pt[nt][c] - f[nt][c] - s_lse[rl]) : 0.f;
        }
      }
      tc_accumulate_xt_y<T, kD>(dv_acc, pt, s_do, lane);

      // dL^T = P^T (dP^T - Dl), dK += dL^T Q.
      float dlt[8][4];
      tc_gemm_xyt<T, kD, true>(dlt, s_v, s_do, warp, lane);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int rl = nt * 8 + 2 * t + (c & 1);
          const bool valid = (valid_bits >> (nt * 4 + c)) & 1u;
          dlt[nt][c] = valid ? pt[nt][c] * (dlt[nt][c] - s_dl[rl]) : 0.f;
        }
      }
      if constexpr (kDkInSmem) {
        tc_accumulate_xt_y_smem<T, kD>(s_dk, dlt, s_q, warp, lane);
      } else {
        tc_accumulate_xt_y<T, kD>(dk_acc, dlt, s_q, lane);
      }

      const bool last_head = hi + 1 == heads;
      if (!last_head) {
        // Sum dL^T for the block's dA, which the last head computes once for all of them.
#pragma unroll
        for (int e = 0; e < 32; ++e)
          s_dsum[e * kThr + threadIdx.x] =
              (hi == 0 ? 0.f : s_dsum[e * kThr + threadIdx.x]) + dlt[e / 4][e % 4];
      } else {
        // dA^T: suffix sums of -dF^T (dL^T summed over the heads, minus the memory term)
        // over later rows, walking this block's rows backwards.
        float dat[8][4];
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
          float carry = dl_suffix[rh];
#pragma unroll
          for (int nt = 7; nt >= 0; --nt) {
            const uint32_t bit = 1u << (nt * 4 + 2 * rh);
            float y0 = dlt[nt][2 * rh], y1 = dlt[nt][2 * rh + 1];
            if (heads > 1) {
              y0 += s_dsum[(nt * 4 + 2 * rh) * kThr + threadIdx.x];
              y1 += s_dsum[(nt * 4 + 2 * rh + 1) * kThr + threadIdx.x];
            }
            if (below_tau & bit) y0 -= s_dmem[nt * 8 + 2 * t];
            if (below_tau & (bit << 1)) y1 -= s_dmem[nt * 8 + 2 * t + 1];
            float inc = y0 + y1;  // becomes the sum over lanes t' >= t of the slice
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
              const float y = __shfl_down_sync(0xffffffffu, inc, off);
              if (t + off <= 3) inc += y;
            }
            float exc = __shfl_down_sync(0xffffffffu, inc, 1);
            if (t == 3) exc = 0.f;
            dat[nt][2 * rh + 1] = (positive & (bit << 1)) ? -(carry + exc) : 0.f;
            dat[nt][2 * rh] = (positive & bit) ? -(carry + exc + y1) : 0.f;
            carry += __shfl_sync(0xffffffffu, inc, lane & ~3);  // the slice's total
          }
          dl_suffix[rh] = carry;
        }

        // dKsel += dA^T Qsel, accumulated in shared memory; dA^T to shared memory.
        tc_accumulate_xt_y_smem<T, kD>(s_dks, dat, s_qsel, warp, lane);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int kl = warp * 16 + g, rl = nt * 8 + 2 * t;
          *reinterpret_cast<uint32_t*>(s_dat + kl * kPStride + rl) =
              pack2<T>(dat[nt][0], dat[nt][1]);
          *reinterpret_cast<uint32_t*>(s_dat + (kl + 8) * kPStride + rl) =
              pack2<T>(dat[nt][2], dat[nt][3]);
        }
      }

      // dL^T to shared memory ([key][row]) for the row-side product dQ.
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int kl = warp * 16 + g, rl = nt * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(s_dlt + kl * kPStride + rl) =
            pack2<T>(dlt[nt][0], dlt[nt][1]);
        *reinterpret_cast<uint32_t*>(s_dlt + (kl + 8) * kPStride + rl) =
            pack2<T>(dlt[nt][2], dlt[nt][3]);
      }
      __syncthreads();  // also: every warp is done with s_q, s_do (and, last head, s_qsel)

      // The next head's Q, dO (or the next query block's Q_sel and head h0's Q, dO) land
      // during this head's dQ (and the block's dQsel) atomics.
      if (!last_head) {
        tc_load_rows_async<T, kD, kBM, kThr>(s_q, seq_inputs<T>(p, b, h + 1, hk, rows).q,
                                             p.q_row_stride, row0, n);
        tc_load_rows_async<T, kD, kBM, kThr>(s_do, seq_dout<T>(p, b, h + 1, rows),
                                             p.dout_row_stride, row0, n);
      } else if (qb > qb_stop) {
        tc_load_rows_async<T, kD, kBM, kThr>(s_q, q0, p.q_row_stride, row0 - kBM, n);
        tc_load_rows_async<T, kD, kBM, kThr>(s_qsel, q_sel, p.q_sel_row_stride, row0 - kBM, n);
        tc_load_rows_async<T, kD, kBM, kThr>(s_do, seq_dout<T>(p, b, h0, rows),
                                             p.dout_row_stride, row0 - kBM, n);
      }
      cp_async_commit();  // possibly empty: the group count stays uniform

      // dQ += scale dL K (this head) and, once per block, dQsel += scale dA Ksel (summed over
      // the heads: one set of atomics per CTA); warps now split the query rows.
      tc_rows_times_keys_atomic<T, kD>(s_dlt, s_k, hr.dq, row0, n, scale, warp, lane);
      if (last_head)
        tc_rows_times_keys_atomic<T, kD>(s_dat, s_ksel, hr.dq_sel, row0, n, scale, warp, lane);
    }
  }
  cp_async_wait<0>();  // the last (empty) group

  if (t == 0) {
    if (key_lo < n) dsuf[key_lo] = dl_suffix[0];
    if (key_hi < n) dsuf[key_hi] = dl_suffix[1];
  }
  const BwdRows<float> kr = bwd_rows(p, ws, b, h0, hk, rows, kD);  // dk, dv (hk), dk_sel
  float *dk = kr.dk, *dv = kr.dv, *dk_sel = kr.dk_sel;
  // This thread's keys: dV, dK from registers, dKsel from its own shared-memory elements.
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int64_t j = rh == 0 ? key_lo : key_hi;
    if (j >= n) continue;
    const int kl = warp * 16 + g + 8 * rh;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      const int d = dt * 8 + 2 * t;
      atomicAdd(dv + j * kD + d, dv_acc[dt][2 * rh]);
      atomicAdd(dv + j * kD + d + 1, dv_acc[dt][2 * rh + 1]);
      if constexpr (kDkInSmem) {
        atomicAdd(dk + j * kD + d, scale * s_dk[kl * kAccStride + d]);
        atomicAdd(dk + j * kD + d + 1, scale * s_dk[kl * kAccStride + d + 1]);
      } else {
        atomicAdd(dk + j * kD + d, scale * dk_acc[dt][2 * rh]);
        atomicAdd(dk + j * kD + d + 1, scale * dk_acc[dt][2 * rh + 1]);
      }
      atomicAdd(dk_sel + j * kD + d, scale * s_dks[kl * kAccStride + d]);
      atomicAdd(dk_sel + j * kD + d + 1, scale * s_dks[kl * kAccStride + d + 1]);
    }
  }
}

// Q heads per CTA of the tensor-core backward: the largest divisor of the GQA group size
// heads_q / heads_kv that still leaves at least two CTAs per SM over the whole key range (one
// count for every superchunk launch: the dF suffix sums handed between them live in the slot
// of the CTA's first head). SELATTN_CUDA_TC_BWD_HEADS=n forces the largest divisor <= n (the
// tests of the head loop).
inline int tc_bwd_heads_per_cta(const PrefillParams& p, int64_t key_blocks, int sms) {
  const int64_t group = p.heads_q / p.heads_kv;
  int64_t cap = group;
  const char* env = std::getenv("SELATTN_CUDA_TC_BWD_HEADS");
  const bool forced = env != nullptr && *env;
  if (forced) cap = std::atoll(env) < 1 ? 1 : std::atoll(env);
  for (int64_t d = cap < group ? cap : group; d > 1; --d) {
    if (group % d != 0) continue;
    if (forced || key_blocks * (p.heads_q / d) * p.batch >= 2 * int64_t(sms)) return int(d);
  }
  return 1;
}

template <typename T, int kD>
cudaError_t launch_tc_bwd_hdim(const PrefillParams& p, cudaStream_t stream) {
  using Cfg = TcBwdConfig<T, kD>;
  constexpr int kChunks = (kD + kTile - 1) / kTile;
  // Checked before anything is enqueued: cudaErrorNotSupported lets the launcher fall back to
  // the SIMT backward (e.g. head dim 128 needs ~190 KB, more than an A100 block may have).
  int device = 0, smem_optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (size_t(smem_optin) < Cfg::kSmemBytes) return cudaErrorNotSupported;
  int sms = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int heads_per_cta = tc_bwd_heads_per_cta(p, ceil_div(p.seqlen, Cfg::kBlockN), sms);
  err = bwd_prologue<T, kChunks, kD>(p, stream);
  if (err != cudaSuccess) return err;
  auto kernel = tc_bwd_kernel<T, kD>;
  if (Cfg::kSmemBytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(Cfg::kSmemBytes));
    if (err != cudaSuccess) return err;
  }
  // Superchunks last to first (simt_bwd.cuh): key blocks up to the superchunk's last row.
  for (int64_t s = num_superchunks(p) - 1; s >= 0; --s) {
    const SuperChunk sc = superchunk(p, s);
    err = bwd_superchunk_prepass<T, kChunks, kD>(p, s, stream);
    if (err != cudaSuccess) return err;
    const int64_t rows_end =
        p.seqlen < sc.end * kSelBlockRows ? p.seqlen : sc.end * kSelBlockRows;
    const dim3 grid(unsigned(ceil_div(rows_end, Cfg::kBlockN)),
                    unsigned(p.heads_q / heads_per_cta), unsigned(p.batch));
    err = launch_kernel(kernel, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p,
                        bwd_accum<float>(p), sc, heads_per_cta);
    if (err != cudaSuccess) return err;
  }
  return bwd_epilogue<T>(p, stream);
}

}  // namespace selattn::cuda
