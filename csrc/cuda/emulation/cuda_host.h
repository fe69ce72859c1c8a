// The CUDA language and runtime as the kernels in csrc/cuda see them, for the host C++ compiler:
// the CPU execution target of DESIGN §4.1. Reached through the stand-in headers in include/
// (cuda_runtime.h, cuda_fp16.h, ...), so kernel files compile unchanged; only csrc/cuda/arch.cuh
// (inline PTX, __shared__ declarations, launches) has a host branch of its own.
//
// Execution model (runtime.cpp): every CUDA thread of a block is a fiber on one host thread;
// blocks run one after another. __syncthreads, __syncwarp and the warp collectives (shuffles,
// ldmatrix, mma) switch fibers, so a missing barrier gives a wrong answer or a race report
// instead of working by accident. Floating point is IEEE on the host: __expf/__logf are the
// precise functions, fp16/bf16 conversions round to nearest even bit-exactly (half.h).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda/emulation/half.h"
#include "cuda/emulation/runtime.h"
#include "cuda/emulation/vector_types.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// No __shared__: a raw declaration must not compile here. Kernels declare shared memory with
// SELATTN_SHARED / SELATTN_DYNAMIC_SHARED (arch.cuh), which the emulation allocates per block
// at its exact size and poisons with NaN.

#define threadIdx (::selattn::emu::thread_idx())
#define blockIdx (::selattn::emu::block_idx())
#define blockDim (::selattn::emu::block_dim())
#define gridDim (::selattn::emu::grid_dim())
constexpr int warpSize = 32;

// ---- runtime API -------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
using cudaStream_t = struct CUstream_st*;
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

inline const char* cudaGetErrorString(cudaError_t e) { return ::selattn::emu::error_string(e); }
inline cudaError_t cudaGetLastError() { return cudaError_t(::selattn::emu::take_last_error()); }
inline cudaError_t cudaPeekAtLastError() { return cudaError_t(::selattn::emu::peek_last_error()); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// The attributes of the GPU the kernels are written for (an H100 SXM).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = int(::selattn::emu::kMaxDynamicSharedOptin);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      size_t(value) > ::selattn::emu::kMaxDynamicSharedOptin)
    return cudaErrorInvalidValue;
  ::selattn::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(func), size_t(value));
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t = nullptr) {
  ::selattn::emu::host_memset(ptr, value, bytes);
  return cudaSuccess;
}

// ---- barriers, warp collectives, atomics -------------------------------------------------
inline void __syncthreads() { ::selattn::emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::selattn::emu::sync_warp(mask); }

template <typename V>
V __shfl_sync(unsigned mask, V var, int src_lane, int width = warpSize) {
  return ::selattn::emu::shuffle(::selattn::emu::ShuffleKind::kIndex, mask, var, src_lane, width);
}
template <typename V>
V __shfl_up_sync(unsigned mask, V var, unsigned delta, int width = warpSize) {
  return ::selattn::emu::shuffle(::selattn::emu::ShuffleKind::kUp, mask, var, int(delta), width);
}
template <typename V>
V __shfl_down_sync(unsigned mask, V var, unsigned delta, int width = warpSize) {
  return ::selattn::emu::shuffle(::selattn::emu::ShuffleKind::kDown, mask, var, int(delta), width);
}
template <typename V>
V __shfl_xor_sync(unsigned mask, V var, int lane_mask, int width = warpSize) {
  return ::selattn::emu::shuffle(::selattn::emu::ShuffleKind::kXor, mask, var, lane_mask, width);
}

// Real atomics: blocks may run on several host threads, and the race checker must see them as
// synchronised accesses, as racecheck does.
template <typename V>
V atomicAdd(V* address, V value) {
  return std::atomic_ref<V>(*address).fetch_add(value, std::memory_order_relaxed);
}

// ---- math and bit casts --------------------------------------------------------------------
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline double __longlong_as_double(long long i) {
  double d;
  std::memcpy(&d, &i, sizeof d);
  return d;
}
template <typename V>
V __ldg(const V* p) {
  return *p;
}
using std::exp;
using std::fmaxf;
using std::fminf;
using std::log;
