// Tensor-core attend kernel of a chunk step (c > 1) against the pruned cache, bf16/fp16, head
// dims 32..128 (DESIGN §3, §4; semantics in decode_params.h). Torch-free. It replaces
// attend_kernel (kernels.cuh) for those steps and keeps its contract: the same grid (splits,
// Hkv, B), the same partial softmax states per (row, split) and the same running-F protocol
// (ws.run slices; run_g[j] = F_j before token t_lo + nadvance after each pass), so
// finish_kernel (merge, F update, insertion, eviction) is shared.
//
// One CTA (4 warps) per (column range, kv group, sequence) walks the group's rows
// r = t * G + g (t-major) in row tiles of 64 rows, in order (pass k + 1 starts from the running
// F that pass k left in run_g, written and read by the same thread). Warp w owns rows
// 16w..16w+15 of the tile. Per key tile of 64 columns, streamed with cp.async in two stages
// (K, V and, for CTAs outside the selection group, the selection group's keys K_sel):
//   1. S = relu(scale Q_sel K_sel^T) for the pass's tokens (rows of Q_sel: tokens t_lo..,
//      warp w tokens 16w..) on the tensor cores, masked to 0 < pos(j) < first + t, into shared
//      memory; one thread per column turns it into the running offsets
//      off[tt][j] = F_j + sum_{t' < t_lo + tt} S[t', j] (tt = 0..ntok) and hands
//      off[nadvance][j] to the next pass through run_g.
//   2. logits = scale Q K^T - off[t(r) - t_lo][j] where pos(j) <= first + t(r), -inf elsewhere;
//      online softmax and O += P V on the fragments (cuda/tc_mma.cuh, shared with prefill).
// K/V are read once per 64 rows of the group instead of once per Tile::kRows (8..16) rows.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/arch.cuh"
#include "cuda/decode/kernels.cuh"
#include "cuda/tc_mma.cuh"

namespace selattn::cuda::decode {

template <typename T, int D>
inline constexpr bool kTcAttend =
    (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) && D % 16 == 0 && D <= 128;

// Shared-memory layout of attend_tc_kernel<T, D>: kStages x (K, V, K_sel) tiles, then Q and
// Q_sel, the offsets off[kRows + 1][kCols] (fp32) and the column positions. Rows padded by 16
// bytes (stride D + 8 elements, what tc_gemm_xyt/tc_accumulate_xt_y expect): ldmatrix is
// conflict-free.
template <typename T, int D>
struct TcTile {
  static constexpr int kRows = 64;  // group rows per pass: 4 warps x 16
  static constexpr int kCols = 64;  // key columns per tile: 8 n-tiles of 8
  static constexpr int kStride = D + 8;
  static constexpr int kVecs = D / 8;  // 16-byte vectors per row
  static constexpr size_t kRowBytes = kStride * sizeof(T);
  static constexpr size_t kPlaneBytes = kCols * kRowBytes;
  static constexpr size_t kStageBytes = 3 * kPlaneBytes;
  static constexpr size_t kQAt = kStages * kStageBytes;
  static constexpr size_t kQselAt = kQAt + kRows * kRowBytes;
  static constexpr size_t kOffAt = kQselAt + kRows * kRowBytes;
  static constexpr size_t kPosAt = kOffAt + up16((kRows + 1) * kCols * sizeof(float));
  static constexpr size_t kBytes = kPosAt + kCols * sizeof(int64_t);
  static_assert(kRows == 16 * kAttendWarps, "one 16-row m-tile per warp");
  static_assert(kBytes <= 227 * 1024, "over the sm_90 dynamic shared-memory limit");
};

template <typename T, int D>
__global__ void __launch_bounds__(kAttendThreads)
    attend_tc_kernel(const DecodeParams p, const Workspace ws) {
  using L = TcTile<T, D>;
  constexpr int kRows = L::kRows, kCols = L::kCols, kStride = L::kStride, kVecs = L::kVecs;
  SELATTN_DYNAMIC_SHARED(smem);
  T* q_s = reinterpret_cast<T*>(smem + L::kQAt);
  T* qsel_s = reinterpret_cast<T*>(smem + L::kQselAt);
  float* off_s = reinterpret_cast<float*>(smem + L::kOffAt);  // [kRows + 1][kCols]
  int64_t* pos_s = reinterpret_cast<int64_t*>(smem + L::kPosAt);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int64_t split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int64_t G = p.heads_q / p.heads_kv, c = p.chunk;
  const int64_t m = valid_new(p, b), first = p.seq_len[b];
  const int64_t sel_kv = p.sel_head / G;
  const bool is_sel = hk == sel_kv;  // uniform per CTA
  float* run_g = ws.run<float>(p.workspace, b, (hk - sel_kv + p.heads_kv) % p.heads_kv);
  const SplitCols cols(ws, split, kCols);
  const float scale = static_cast<float>(p.scale);
  const float* f_cached = static_cast<const float*>(p.f) + b * p.slots;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride;

  // Issues the cp.async copies of tile i (K, V and, outside the selection group, K_sel) into
  // stage i % kStages; columns past the range or with nothing in them are zero-filled.
  auto issue = [&](int64_t i) {
    unsigned char* stage = smem + (i % kStages) * L::kStageBytes;
    const int64_t c0 = cols.start(i);
    const int planes = is_sel ? 2 : 3;
    for (int x = tid; x < planes * kCols * kVecs; x += kAttendThreads) {
      const int which = x / (kCols * kVecs), rem = x % (kCols * kVecs);
      const int jj = rem / kVecs, vec = rem % kVecs;
      const int64_t j = c0 + jj;
      const bool valid = j < cols.end && column_pos(p, b, j, m, first) >= 0;
      const T* row = !valid       ? static_cast<const T*>(p.k_cache)
                     : which == 0 ? key_row<T>(p, b, hk, j)
                     : which == 1 ? value_row<T>(p, b, hk, j)
                                  : key_row<T>(p, b, sel_kv, j);
      cp_async_16(stage + which * L::kPlaneBytes + jj * L::kRowBytes + vec * 16,
                  reinterpret_cast<const uint4*>(row) + (valid ? vec : 0), valid);
    }
  };

  const int64_t rows_total = m * G;  // group rows r = t * G + g, t-major
  for (int64_t r0 = 0; r0 < rows_total; r0 += kRows) {
    const auto [nrows, t_lo, ntok, nadvance] = row_pass(r0, rows_total, G, kRows);
    __syncthreads();  // the previous pass is done with q_s and qsel_s
    for (int x = tid; x < kRows * kVecs; x += kAttendThreads) {
      const int r = x / kVecs, vec = x % kVecs;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < nrows) {
        const int64_t row = r0 + r, h = hk * G + row % G, t = row / G;
        val = *reinterpret_cast<const uint4*>(q + h * p.q_head_stride + t * p.q_row_stride +
                                              vec * 8);
      }
      *reinterpret_cast<uint4*>(q_s + r * kStride + vec * 8) = val;
    }
    // Q_sel rows 0..ntok-1: the selection head at tokens t_lo.., zeros below.
    tc_load_rows<T, D, kRows, kAttendThreads>(qsel_s, q + p.sel_head * p.q_head_stride,
                                              p.q_row_stride, t_lo, t_lo + ntok);

    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};  // rows warp*16 + g (+ 8)
    // This lane's two rows: live, and their token relative to t_lo.
    int r_tok[2];
    bool r_live[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int r = warp * 16 + g + 8 * rh;
      r_live[rh] = r < nrows;
      r_tok[rh] = r_live[rh] ? static_cast<int>((r0 + r) / G - t_lo) : 0;
    }

    if (cols.ntiles > 0) issue(0);
    cp_async_commit();
    for (int64_t i = 0; i < cols.ntiles; ++i) {
      if (i + 1 < cols.ntiles) issue(i + 1);
      cp_async_commit();  // possibly empty: keeps the group count uniform
      const int64_t c0 = cols.start(i);
      const int ncols = cols.count(i);
      if (tid < kCols) {
        const int64_t j = c0 + tid;
        const int64_t pj = tid < ncols ? column_pos(p, b, j, m, first) : -1;
        pos_s[tid] = pj;
        off_s[tid] = offset_before_pass<float>(p, j, pj, t_lo, run_g, f_cached);
      }
      cp_async_wait<1>();  // this thread's copies of tile i have landed
      __syncthreads();     // ... and everyone's
      const T* k_tile = reinterpret_cast<const T*>(smem + (i % kStages) * L::kStageBytes);
      const T* v_tile = k_tile + kCols * kStride;
      const T* ksel_tile = is_sel ? k_tile : v_tile + kCols * kStride;

      // 1. S[tt][j] for the pass's tokens (warp w: tokens 16w..16w+15), into off rows 1..ntok.
      {
        float sc[8][4];
        tc_gemm_xyt<T, D, (D > 64)>(sc, qsel_s, ksel_tile, warp, lane);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int tt = warp * 16 + g + 8 * (e / 2), jj = nt * 8 + 2 * tq + e % 2;
            const int64_t pj = pos_s[jj];
            const float x = scale * sc[nt][e];
            const bool counted = tt < ntok && pj > 0 && pj < first + t_lo + tt;
            off_s[(tt + 1) * kCols + jj] = counted && x > 0.f ? x : 0.f;
          }
      }
      __syncthreads();
      // Running sums down the tokens, one thread per column: off[tt] = F before token t_lo + tt.
      if (tid < kCols) {
        float run = off_s[tid];
        for (int tt = 1; tt <= ntok; ++tt) {
          run += off_s[tt * kCols + tid];
          off_s[tt * kCols + tid] = run;
        }
        if (tid < ncols) run_g[c0 + tid] = off_s[nadvance * kCols + tid];
      }
      __syncthreads();

      // 2. Logits s q.k - off, -inf where hidden; online softmax; O += P V.
      float s[8][4];
      tc_gemm_xyt<T, D, (D > 64)>(s, q_s, k_tile, warp, lane);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rh = e / 2, jj = nt * 8 + 2 * tq + e % 2;
          const int64_t pj = pos_s[jj];
          const bool visible = r_live[rh] && pj >= 0 && pj <= first + t_lo + r_tok[rh];
          s[nt][e] = visible ? scale * s[nt][e] - off_s[r_tok[rh] * kCols + jj] : -INFINITY;
        }
      tc_online_softmax(s, m_r, l_r, o);
      tc_accumulate_xt_y<T, D>(o, s, v_tile, lane);
      __syncthreads();  // this stage, off_s and pos_s are free for the next tile
    }
    cp_async_wait<0>();  // the trailing (empty) group

    // Partial state of this lane's rows for this split (the four lanes of a row group share
    // the row: each writes its own columns, lane tq == 0 the statistics).
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      if (!r_live[rh]) continue;
      const int64_t row = r0 + warp * 16 + g + 8 * rh, h = hk * G + row % G, t = row / G;
      const int64_t state = ((b * p.heads_q + h) * c + t) * ws.splits + split;
      float* dst = ws.get<float>(p.workspace, ws.part_acc_at) + state * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const int d = dt * 8 + 2 * tq;
        dst[d] = o[dt][2 * rh], dst[d + 1] = o[dt][2 * rh + 1];
      }
      if (tq == 0) {
        ws.get<float>(p.workspace, ws.part_m_at)[state] = m_r[rh];
        ws.get<float>(p.workspace, ws.part_l_at)[state] = l_r[rh];
      }
    }
  }
}

// Launches attend_tc_kernel on the attend grid (the caller checked kTcAttend and c > 1).
template <typename T, int D>
cudaError_t launch_attend_tc(const DecodeParams& p, const Workspace& ws, dim3 grid,
                             cudaStream_t stream) {
  using L = TcTile<T, D>;
  auto kernel = attend_tc_kernel<T, D>;
  if (L::kBytes > 48 * 1024) {
    // A function attribute, not a device query or a stream operation (graph-capture safe).
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L::kBytes));
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(kernel, grid, dim3(kAttendThreads), L::kBytes, stream, p, ws);
}

}  // namespace selattn::cuda::decode
