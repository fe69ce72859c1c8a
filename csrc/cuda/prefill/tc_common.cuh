// Device helpers shared by the tensor-core prefill kernels (tc_fwd, tc_bwd, the tensor-core
// selection pre-pass): 16-byte row staging into padded shared memory and X Y^T on mma.sync
// m16n8k16 fragments (fragment layouts: arch.cuh). Torch-free.
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

}  // namespace selattn::cuda
