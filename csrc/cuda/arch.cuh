// The one header whose contents differ between nvcc and the CPU execution target (DESIGN §4.1,
// csrc/cuda/emulation/): inline PTX (ldmatrix, mma.sync), shared-memory declarations and kernel
// launches. Kernel files use only what is here and the CUDA headers, so the same kernel source
// runs on the GPU and, compiled by the host C++ compiler with SELATTN_HOST_EMULATION, on the
// CPU. Torch-free.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), each register two 16-bit
// elements, the lower column in the low half:
//   A 16x16 (row-major): a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B 16x8  (k x n):     b0 (k 2t..2t+1, n g)  b1 (k 2t+8..2t+9, n g)
//   C 16x8  (fp32):      c0, c1 (g, 2t..2t+1)  c2, c3 (g+8, 2t..2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <utility>

namespace selattn::cuda {

// Lets SELATTN_SHARED take array types: shared_type<float[8][33]> name.
template <typename T>
using shared_type = T;

}  // namespace selattn::cuda

#if defined(SELATTN_HOST_EMULATION)
// One allocation per declaration site and block, exact size, poisoned (emulation/runtime.cpp).
#define SELATTN_SHARED(name, ...)                                                       \
  static char selattn_shared_site_##name;  /* its address names the declaration */    \
  ::selattn::cuda::shared_type<__VA_ARGS__>& name =                                      \
      *static_cast<::selattn::cuda::shared_type<__VA_ARGS__>*>(::selattn::emu::block_shared( \
          &selattn_shared_site_##name, sizeof(__VA_ARGS__), alignof(__VA_ARGS__)))
#define SELATTN_DYNAMIC_SHARED(name) unsigned char* name = ::selattn::emu::dynamic_shared()
#else
#define SELATTN_SHARED(name, ...) __shared__ ::selattn::cuda::shared_type<__VA_ARGS__> name
#define SELATTN_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace selattn::cuda {

// kernel<<<grid, block, smem, stream>>>(args...), then cudaGetLastError(). Every launch goes
// through here, so the real launchers (grid shapes, shared memory, workspaces, path choice)
// run unchanged in the CPU execution target.
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
#if defined(SELATTN_HOST_EMULATION)
  (void)stream;  // one stream: launches run in order
  return cudaError_t(::selattn::emu::launch(kernel, grid, block, smem, std::forward<Args>(args)...));
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m, register m
// receives it (lane holds row lane/4, columns 2*(lane%4), +1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if defined(SELATTN_HOST_EMULATION)
  ::selattn::emu::check_ldmatrix_row(smem);
  uint4 row;
  std::memcpy(&row, smem, sizeof row);  // this lane's read of the row it addresses
  ::selattn::emu::ldmatrix_exchange(r, &row, false);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

// Same, each matrix transposed (lane holds column lane/4, rows 2*(lane%4), +1).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#if defined(SELATTN_HOST_EMULATION)
  ::selattn::emu::check_ldmatrix_row(smem);
  uint4 row;
  std::memcpy(&row, smem, sizeof row);
  ::selattn::emu::ldmatrix_exchange(r, &row, true);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
#if defined(SELATTN_HOST_EMULATION)
  ::selattn::emu::mma_m16n8k16(c, a, b0, b1, /*bf16=*/true);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
#if defined(SELATTN_HOST_EMULATION)
  ::selattn::emu::mma_m16n8k16(c, a, b0, b1, /*bf16=*/false);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats as one register of two 16-bit elements, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}

// cp.async.cg: 16 bytes global -> shared, asynchronously; with `src_valid` false the 16 bytes
// are zero-filled and nothing is read (gmem must still be a valid address). Copies issued
// before a cp_async_commit form one group; cp_async_wait<N> waits until at most N of this
// thread's groups are in flight. Other threads see the data only after a barrier. Host branch
// (DESIGN §4.1): the destination is poisoned (NaN) at issue and the copy lands only at the
// wait that covers its group, so a missing wait or barrier is a wrong answer or a race report.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool src_valid) {
#if defined(SELATTN_HOST_EMULATION)
  std::memset(smem, 0xff, 16);
  ::selattn::emu::cp_async_push({smem, gmem, 16u, src_valid ? 16u : 0u});
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
               "r"(src_valid ? 16 : 0)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(SELATTN_HOST_EMULATION)
  ::selattn::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(SELATTN_HOST_EMULATION)
  ::selattn::emu::AsyncCopy landing[16];
  while (const size_t n = ::selattn::emu::cp_async_pop(N, landing, 16)) {
    for (size_t i = 0; i < n; ++i) {
      const auto& c = landing[i];
      std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
  }
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace selattn::cuda
