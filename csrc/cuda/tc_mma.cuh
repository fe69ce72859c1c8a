// Device helpers shared by the tensor-core kernels (prefill: tc_fwd, tc_bwd, the tensor-core
// selection pre-pass; decode: the chunk kernel decode/tc_attend.cuh): 16-byte row staging into
// padded shared memory (plain or cp.async), X Y^T on mma.sync m16n8k16 fragments, and the flash-attention online
// softmax and O += P V on those fragments (fragment layouts: arch.cuh). Torch-free.
#pragma once

#include "cuda/arch.cuh"

#include <cstdint>

namespace selattn::cuda {

// Rows [row0, row0 + kRows) of a (n x kD) matrix into padded shared memory (row stride
// kD + 8 elements), 16 bytes at a time; zeros past row n.
template <typename T, int kD, int kRows, int kThreadCount>
__device__ __forceinline__ void tc_load_rows(T* smem, const T* src, int64_t row_stride,
                                             int64_t row0, int64_t n) {
  constexpr int kVecs = kD / 8;  // 8 x 16-bit per 16-byte vector
  constexpr int kStride = kD + 8;
  for (int e = threadIdx.x; e < kRows * kVecs; e += kThreadCount) {
    const int r = e / kVecs, c = (e % kVecs) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (row0 + r < n) val = *reinterpret_cast<const uint4*>(src + (row0 + r) * row_stride + c);
    *reinterpret_cast<uint4*>(smem + r * kStride + c) = val;
  }
}

// The same rows with cp.async (16-byte cp.async.cg, zero-filled past row n): the copies join
// the calling thread's open cp.async group and are visible after its cp_async_wait and a
// barrier. Rows past n read nothing (row 0, always present, stands in as the address).
template <typename T, int kD, int kRows, int kThreadCount>
__device__ __forceinline__ void tc_load_rows_async(T* smem, const T* src, int64_t row_stride,
                                                   int64_t row0, int64_t n) {
  constexpr int kVecs = kD / 8;
  constexpr int kStride = kD + 8;
  for (int e = threadIdx.x; e < kRows * kVecs; e += kThreadCount) {
    const int r = e / kVecs, c = (e % kVecs) * 8;
    const bool valid = row0 + r < n;
    cp_async_16(smem + r * kStride + c, src + (valid ? (row0 + r) * row_stride + c : 0), valid);
  }
}

// acc[mt] (rows 16 mt .. 16 mt + 15 of sx x 64 rows of sy, as 8 C fragments) = X Y^T over kD,
// for kM consecutive 16-row m-tiles starting at sx. Each k-step loads the B fragments of sy
// once for all kM m-tiles. kRollK keeps the k loop rolled (fewer ldmatrix results in flight:
// for register-tight callers).
template <typename T, int kD, int kM, bool kRollK = false>
__device__ __forceinline__ void tc_gemm_xyt_rows(float (&acc)[kM][8][4], const T* sx,
                                                 const T* sy, int lane) {
  constexpr int kStride = kD + 8;
#pragma unroll
  for (int mt = 0; mt < kM; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mt][nt][c] = 0.f;
#pragma unroll(kRollK ? 1 : kD / 16)
  for (int ks = 0; ks < kD / 16; ++ks) {
    uint32_t a[kM][4];
#pragma unroll
    for (int mt = 0; mt < kM; ++mt)
      ldmatrix_x4(a[mt], sx + (mt * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * kStride +
                             ks * 16 + 8 * (lane / 16));
#pragma unroll
    for (int np = 0; np < 4; ++np) {  // pairs of 8-key n-tiles
      uint32_t b[4];
      ldmatrix_x4(b, sy + (np * 16 + (lane % 8) + 8 * (lane / 16)) * kStride + ks * 16 +
                         8 * ((lane / 8) % 2));
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc (16 rows of this warp x 64 keys, as 8 C fragments) = X[warp rows] Y^T over kD: the
// one-m-tile case, warp w taking rows 16w..16w+15 of sx.
template <typename T, int kD, bool kRollK = false>
__device__ __forceinline__ void tc_gemm_xyt(float (&acc)[8][4], const T* sx, const T* sy,
                                            int warp, int lane) {
  tc_gemm_xyt_rows<T, kD, 1, kRollK>(reinterpret_cast<float(&)[1][8][4]>(acc),
                                     sx + warp * 16 * (kD + 8), sy, lane);
}

// One online-softmax step on a warp's 16 x 64 logit tile s (C fragments, -inf = masked; rows
// g = lane / 4 in c = 0, 1 and g + 8 in c = 2, 3): updates the running max m and sum l of the
// lane's two rows, rescales their output fragments o, and turns s into exp(s - m) (0 where
// masked).
template <int kDT>
__device__ __forceinline__ void tc_online_softmax(float (&s)[8][4], float (&m)[2], float (&l)[2],
                                                  float (&o)[kDT][4]) {
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) tile_max[c / 2] = fmaxf(tile_max[c / 2], s[nt][c]);
  float alpha[2];
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    // The four lanes of a row group (t = 0..3) hold the row's 64 logits.
    tile_max[rh] = fmaxf(tile_max[rh], __shfl_xor_sync(0xffffffffu, tile_max[rh], 1));
    tile_max[rh] = fmaxf(tile_max[rh], __shfl_xor_sync(0xffffffffu, tile_max[rh], 2));
    const float m_new = fmaxf(m[rh], tile_max[rh]);
    // m == -inf: nothing accumulated yet (o, l are 0); also avoids exp(-inf - -inf).
    alpha[rh] = m[rh] == -INFINITY ? 0.f : __expf(m[rh] - m_new);
    m[rh] = m_new;
  }
  float row_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int rh = c / 2;
      // A -inf logit gives p = 0 explicitly; its row max m may itself be -inf (empty rows).
      s[nt][c] = s[nt][c] == -INFINITY ? 0.f : __expf(s[nt][c] - m[rh]);
      row_sum[rh] += s[nt][c];
    }
  }
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    row_sum[rh] += __shfl_xor_sync(0xffffffffu, row_sum[rh], 1);
    row_sum[rh] += __shfl_xor_sync(0xffffffffu, row_sum[rh], 2);
    l[rh] = l[rh] * alpha[rh] + row_sum[rh];
  }
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
    o[dt][0] *= alpha[0], o[dt][1] *= alpha[0];
    o[dt][2] *= alpha[1], o[dt][3] *= alpha[1];
  }
}

// acc (16 rows of this warp x kD, C fragments) += X Y over 64 inner indices: X (this warp's
// 16 rows x 64) given as 8 C fragments and re-packed as A operands, 16 per k-step; Y (64 x kD)
// in padded shared memory (row stride kD + 8). O += P V in the forward kernels (P from
// tc_online_softmax); dV += P^T dO and dK += dL^T Q in the backward (X^T held transposed).
template <typename T, int kD>
__device__ __forceinline__ void tc_accumulate_xt_y(float (&acc)[kD / 8][4], const float (&x)[8][4],
                                                   const T* s_y, int lane) {
  constexpr int kStride = kD + 8;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4];
    a[0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);
    a[1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);
    a[2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
#pragma unroll
    for (int dn = 0; dn < kD / 16; ++dn) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, s_y + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * kStride +
                               dn * 16 + 8 * (lane / 16));
      mma_16816<T>(acc[2 * dn], a, b[0], b[1]);
      mma_16816<T>(acc[2 * dn + 1], a, b[2], b[3]);
    }
  }
}

}  // namespace selattn::cuda
