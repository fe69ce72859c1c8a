// Tensor-core column sums of the selection pre-pass (DESIGN §4), bf16/fp16 at head dims 32,
// 64, 96, 128: writes the same Csum[b][I][j] = sum_{k in block I} S[k][j] as
// selection_colsum_kernel (prepass.cuh), into the same Poff rows (I - sc.begin, width
// p.seqlen), with S = relu(scale * Q_sel K_sel^T) masked by selection_score (1 <= j < i < n).
// The exclusive scan over blocks (prepass.cuh) then runs unchanged. Torch-free.
//
// Tile: a CTA of 4 warps covers 128 query rows (4 Poff blocks of 32) x 64 keys. Warp w owns
// the 32 rows of block 4g + w (two m16 tiles) against all 64 keys, so one K_sel tile in shared
// memory feeds four warps (each k-step: 2 A + 4 B ldmatrix.x4 for 16 mma), and a block's column
// sum never leaves its warp: the 4 rows a lane holds per column are added in registers, then a
// reduce-scatter over the 8 row lanes (14 shuffles for the warp's 64 columns instead of 3 per
// column) leaves columns 2 lane and 2 lane + 1 in lane `lane`, one fp32 store each. No
// cross-warp reduction, no second barrier. ptxas sm_90: 95-96 registers, no spills (5 CTAs
// per SM); Q_sel + K_sel staging is 192 x (D + 8) x 2 bytes (52 KB at D = 128: 4 CTAs per SM).
//
// Grid (CTAs, batch): only the causal half. Row group g (query blocks sc.begin + 4g ..
// +3, rows from R_g = 32 (sc.begin + 4g)) has nonzero S only in keys j < R_g + 127, i.e. in
// its first T_g = c0 + 2g column tiles (c0: TcColsumGrid); CTA x maps to (g, t < T_g) by
// inverting the triangular prefix count. Keys from 64 T_g to the superchunk's end are zero
// for the group's blocks, and the scan reads them: the CTAs of each later group g' write
// those zeros for the band its own tiles add, [64 T_{g'-1}, 64 T_{g'}) (128 keys), CTA t of
// g' for the blocks 2t and 2t + 1 of the superchunk (2 x 128 floats per CTA, balanced), so
// every Poff entry the scan reads is written exactly once and none twice.
#pragma once

#include <cmath>
#include <type_traits>

#include "cuda/arch.cuh"
#include "cuda/prefill/common.cuh"
#include "cuda/prefill/dispatch.h"
#include "cuda/tc_mma.cuh"

namespace selattn::cuda {

template <typename T, int kD>
struct TcColsumConfig {
  static_assert(kD % 16 == 0 && kD <= 128, "head dim must be a multiple of 16, at most 128");
  static_assert(std::is_same_v<acc_t<T>, float>, "Poff is fp32 for the 16-bit dtypes");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = kWarps * int(kSelBlockRows);  // one Poff block per warp
  static constexpr int kCols = 64;                           // keys per tile (8 n8 tiles)
  static constexpr int kStride = kD + 8;  // +16 bytes: conflict-free ldmatrix rows
  static constexpr size_t kSmemBytes = size_t(kRows + kCols) * kStride * sizeof(T);
};

// The causal half of one superchunk's (row group, column tile) pairs, per batch element.
// Group g has tiles(g) = c0 + 2g column tiles (64 keys; 2 per 128-row group), except the last
// group, clipped to tmax = ceil(ncols / 64); the groups before it never reach tmax (their rows
// end before ncols), so first(g) = sum_{h < g} (c0 + 2h) holds for every g < groups.
struct TcColsumGrid {
  int64_t groups;  // 128-row groups of the superchunk
  int64_t c0;      // column tiles of group 0: those with a key < R_0 + 127
  int64_t tmax;    // column tiles of the superchunk's keys
  int64_t ncols;   // keys that rows of the superchunk can select: min(seqlen, 32 sc.end)
  int64_t ctas;    // CTAs per batch element

  __host__ __device__ int64_t tiles(int64_t g) const {
    const int64_t t = c0 + 2 * g;
    return t < tmax ? t : tmax;
  }
  __host__ __device__ int64_t first(int64_t g) const { return g * c0 + g * (g - 1); }

  // CTA x -> (group g, tile t): the largest g with first(g) <= x (the root of
  // g^2 + (c0 - 1) g = x, then exact integer correction).
  __host__ __device__ void locate(int64_t x, int64_t& g, int64_t& t) const {
    const double bq = double(c0 - 1);
    int64_t gg = int64_t((-bq + sqrt(bq * bq + 4.0 * double(x))) * 0.5);
    gg = gg < 0 ? 0 : gg >= groups ? groups - 1 : gg;
    while (gg + 1 < groups && first(gg + 1) <= x) ++gg;
    while (gg > 0 && first(gg) > x) --gg;
    g = gg;
    t = x - first(gg);
  }
};

inline TcColsumGrid tc_colsum_grid(int64_t seqlen, const SuperChunk& sc) {
  constexpr int64_t kRows = 4 * kSelBlockRows, kCols = 64;
  TcColsumGrid gr{};
  const int64_t rows_begin = sc.begin * kSelBlockRows;
  gr.ncols = seqlen < sc.end * kSelBlockRows ? seqlen : sc.end * kSelBlockRows;
  if (sc.end <= sc.begin || gr.ncols <= rows_begin) return gr;  // no rows: ctas = 0
  gr.groups = (sc.end - sc.begin + 3) / 4;
  gr.c0 = (rows_begin + kRows - 2) / kCols + 1;  // tiles t with 64 t <= R_0 + 126
  gr.tmax = (gr.ncols + kCols - 1) / kCols;
  gr.ctas = gr.first(gr.groups - 1) + gr.tiles(gr.groups - 1);
  return gr;
}

// One reduce-scatter step over lane bit `mask`: v[0, kHalf) becomes this lane's half of
// v[0, 2 kHalf) (the upper half where the bit is set) plus the partner lane's copy of it.
// Compile-time indices only, so v stays in registers.
template <int kHalf>
__device__ __forceinline__ void colsum_halve(float (&v)[16], int lane, int mask) {
  const bool upper = (lane & mask) != 0;
#pragma unroll
  for (int e = 0; e < kHalf; ++e) {
    const float keep = upper ? v[e + kHalf] : v[e];
    const float send = upper ? v[e] : v[e + kHalf];
    v[e] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(TcColsumConfig<T, kD>::kThreads)
    tc_selection_colsum_kernel(const PrefillParams p, float* __restrict__ poff,
                               const SuperChunk sc, const TcColsumGrid grid) {
  using Cfg = TcColsumConfig<T, kD>;
  constexpr int kRows = Cfg::kRows, kCols = Cfg::kCols, kStride = Cfg::kStride;
  constexpr int kThr = Cfg::kThreads;
  SELATTN_DYNAMIC_SHARED(smem_raw);
  T* s_qsel = reinterpret_cast<T*>(smem_raw);
  T* s_ksel = s_qsel + kRows * kStride;

  int64_t g, t;
  grid.locate(blockIdx.x, g, t);
  const int64_t b = blockIdx.y;
  const SeqRows rows = seq_rows(p, b);
  const int64_t n = rows.n;
  const int64_t row0 = (sc.begin + 4 * g) * kSelBlockRows;
  // Past this sequence's end (varlen): no rows to sum, and the zero band below starts at
  // 64 tiles(g - 1) >= row0 >= n. Uniform, before any barrier.
  if (row0 >= n) return;
  const int64_t lim = n < grid.ncols ? n : grid.ncols;  // keys the scan reads
  const int64_t w = p.seqlen;                           // Poff row width
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t col0 = t * kCols;

  if (col0 < lim) {  // uniform
    const T* q_sel = static_cast<const T*>(p.q_sel) + b * p.q_sel_batch_stride +
                     rows.start * p.q_sel_row_stride;
    const T* k_sel = static_cast<const T*>(p.k_sel) + b * p.k_sel_batch_stride +
                     rows.start * p.k_sel_row_stride;
    tc_load_rows<T, kD, kRows, kThr>(s_qsel, q_sel, p.q_sel_row_stride, row0, n);
    tc_load_rows<T, kD, kCols, kThr>(s_ksel, k_sel, p.k_sel_row_stride, col0, n);
    __syncthreads();
    float acc[2][8][4];  // rows 16 mt + (g, g + 8) of the warp's block x keys 8 nt + 2 t + c
    tc_gemm_xyt_rows<T, kD, 2>(acc, s_qsel + warp * kSelBlockRows * kStride, s_ksel, lane);

    const int64_t blk = sc.begin + 4 * g + warp;
    const int64_t wrow0 = blk * kSelBlockRows;
    const int fg = lane / 4, ft = lane % 4;  // fragment row group and column pair
    const float scale = float(p.scale);
    // Every (row, key) of the warp's tile passes the mask: key 0 not in it, all keys before
    // the block's first row, all rows before n. Warp-uniform.
    const bool interior = col0 >= 1 && col0 + kCols - 1 < wrow0 && wrow0 + kSelBlockRows <= n;
    float v[16];  // v[2 nt + c]: this lane's rows summed, key 8 nt + 2 ft + c
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float sum = 0.f;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float a = scale * acc[mt][nt][2 * h + c];
            if (interior) {
              sum += a > 0.f ? a : 0.f;  // selection_score with the mask known to pass
            } else {
              const int64_t i = wrow0 + 16 * mt + 8 * h + fg;
              const int64_t j = col0 + 8 * nt + 2 * ft + c;
              sum += selection_score(a, i, j, n);
            }
          }
        }
        v[2 * nt + c] = sum;
      }
    }
    // Reduce-scatter over the 8 lanes of a column pair (lane bits 4, 3, 2 = bits 2, 1, 0 of
    // fg): each step keeps the half of v named by the lane's bit and adds the partner's copy
    // of that half, so v[0], v[1] end as the sums of v[2 fg], v[2 fg + 1] over the 8 lanes:
    // keys 8 fg + 2 ft + c = 2 lane + c.
    colsum_halve<8>(v, lane, 16);
    colsum_halve<4>(v, lane, 8);
    colsum_halve<2>(v, lane, 4);
    if (blk < sc.end && wrow0 < n) {  // warp-uniform; nothing synchronizes after this
      float* dst = poff + (b * sc.stride + blk - sc.begin) * w;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t j = col0 + 2 * lane + c;
        if (j < lim) dst[j] = v[c];
      }
    }
  }

  // The zero band of this group's columns for the blocks of the earlier groups (see top).
  if (g > 0) {
    const int64_t z0 = grid.tiles(g - 1) * kCols;
    const int64_t z1 = grid.tiles(g) * kCols < lim ? grid.tiles(g) * kCols : lim;
    for (int64_t rb = 2 * t; rb < 2 * t + 2 && rb < 4 * g; ++rb) {
      if ((sc.begin + rb) * kSelBlockRows >= n) break;
      float* dst = poff + (b * sc.stride + rb) * w;
      for (int64_t j = z0 + threadIdx.x; j < z1; j += kThr) dst[j] = 0.f;
    }
  }
}

// Csum rows of superchunk sc into poff (then the scan of prepass.cuh). q_sel/k_sel rows must
// be 16-byte aligned (the tensor-core launchers' eligibility check).
template <typename T, int kD>
cudaError_t launch_tc_selection_colsum(const PrefillParams& p, float* poff, const SuperChunk& sc,
                                       cudaStream_t stream) {
  using Cfg = TcColsumConfig<T, kD>;
  const TcColsumGrid grid = tc_colsum_grid(p.seqlen, sc);
  if (grid.ctas == 0) return cudaSuccess;
  if (grid.ctas > 0x7fffffff || p.batch > 65535) return cudaErrorInvalidConfiguration;
  auto kernel = tc_selection_colsum_kernel<T, kD>;
  if (Cfg::kSmemBytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Cfg::kSmemBytes));
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(kernel, dim3(unsigned(grid.ctas), unsigned(p.batch)), dim3(Cfg::kThreads),
                       Cfg::kSmemBytes, stream, p, poff, sc, grid);
}

}  // namespace selattn::cuda
