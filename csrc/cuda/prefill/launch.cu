// CUDA prefill launchers (declared in launch.h): workspace sizes and dispatch on dtype to the
// kernels. Every dtype and head dim 1..256 has the SIMT path (instantiations/prefill_simt_*.cu);
// the bf16/fp16 forward at head dims 32/64/96/128 takes the tensor-core path (prefill_tc_fwd_*)
// unless SELATTN_CUDA_FORCE_SIMT=1 is set (read at every call, so tests can compare the two).
// The tensor-core backward (prefill_tc_bwd_*, same dtypes and head dims) is the default there
// too; SELATTN_CUDA_TC_BWD=0 opts out (the SIMT backward), e.g. to compare the two or should a
// GPU run disagree with the emulated matrix (bench/results/cuda_emulation_*), which it passes.
// The tensor-core forward and backward run the tensor-core selection pre-pass
// (tc_prepass.cuh), the SIMT ones the SIMT pre-pass (prepass.cuh). Every one of these kernels
// also implements the memory-loss output (PrefillParams::mem) and its gradient (dmem) itself,
// in its head-0 CTAs, so a mem_tau request takes the same path as a plain call.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda/prefill/launch.h"
#include "cuda/prefill/dispatch.h"

namespace selattn::cuda {

bool prefill_supported(DType dtype, int64_t head_dim) {
  const bool known_dtype = dtype == DType::kFloat32 || dtype == DType::kFloat64 ||
                           dtype == DType::kBFloat16 || dtype == DType::kFloat16;
  return known_dtype && head_dim >= 1 && head_dim <= 256;
}

// The pre-pass grid is (column tiles, query blocks of 32, batch); the main kernels' grids are
// (query or key blocks, heads, batch). y and z are limited to 65535.
int64_t prefill_max_seqlen() { return 65535 * kSelBlockRows; }

bool prefill_grid_fits(int64_t batch, int64_t heads_q, int64_t seqlen) {
  return batch <= 65535 && heads_q <= 65535 && seqlen <= prefill_max_seqlen();
}

size_t prefill_fwd_workspace_bytes(const PrefillParams& p) { return fwd_workspace_bytes(p); }

size_t prefill_bwd_workspace_bytes(const PrefillParams& p) { return bwd_layout(p).total; }

namespace {

// Refuse rather than write out of bounds if the caller's workspace is short.
bool workspace_ok(const PrefillParams& p, size_t needed) {
  return p.workspace != nullptr && p.workspace_bytes >= needed;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool env_is(const char* name, const char* want) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, want) == 0;
}

bool env_is_1(const char* name) { return env_is(name, "1"); }

// The tensor-core forward loads and stores rows 16 bytes at a time: every row start must be
// 16-byte aligned, i.e. aligned base pointers and strides that are multiples of 8 elements.
bool tc_fwd_eligible(const PrefillParams& p) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return false;
  if (p.head_dim != 32 && p.head_dim != 64 && p.head_dim != 96 && p.head_dim != 128) return false;
  if (env_is_1("SELATTN_CUDA_FORCE_SIMT")) return false;
  const int64_t strides[] = {p.q_batch_stride,     p.q_head_stride,     p.q_row_stride,
                             p.k_batch_stride,     p.k_head_stride,     p.k_row_stride,
                             p.v_batch_stride,     p.v_head_stride,     p.v_row_stride,
                             p.q_sel_batch_stride, p.q_sel_row_stride,  p.k_sel_batch_stride,
                             p.k_sel_row_stride,  p.out_batch_stride,  p.out_head_stride,
                             p.out_row_stride};
  for (int64_t s : strides)
    if (s % 8 != 0) return false;
  return aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.q_sel) &&
         aligned16(p.k_sel) && aligned16(p.out);
}

// The backward also loads dout rows 16 bytes at a time.
bool tc_bwd_eligible(const PrefillParams& p) {
  if (env_is("SELATTN_CUDA_TC_BWD", "0") || !tc_fwd_eligible(p)) return false;
  return p.dout_batch_stride % 8 == 0 && p.dout_head_stride % 8 == 0 &&
         p.dout_row_stride % 8 == 0 && aligned16(p.dout);
}

template <typename T>
cudaError_t launch_tc_bwd(const PrefillParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch_tc_bwd_hdim<T, 32>(p, stream);
    case 64: return launch_tc_bwd_hdim<T, 64>(p, stream);
    case 96: return launch_tc_bwd_hdim<T, 96>(p, stream);
    default: return launch_tc_bwd_hdim<T, 128>(p, stream);
  }
}

template <typename T>
cudaError_t launch_tc_fwd(const PrefillParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch_tc_fwd_hdim<T, 32>(p, stream);
    case 64: return launch_tc_fwd_hdim<T, 64>(p, stream);
    case 96: return launch_tc_fwd_hdim<T, 96>(p, stream);
    default: return launch_tc_fwd_hdim<T, 128>(p, stream);
  }
}

}  // namespace

cudaError_t prefill_fwd(const PrefillParams& p, cudaStream_t stream) {
  if (!prefill_supported(p.dtype, p.head_dim)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen == 0) return cudaSuccess;
  if (!prefill_grid_fits(p.batch, p.heads_q, p.seqlen)) return cudaErrorInvalidConfiguration;
  if (!workspace_ok(p, prefill_fwd_workspace_bytes(p))) return cudaErrorInvalidValue;
  if (tc_fwd_eligible(p)) {
    return p.dtype == DType::kBFloat16 ? launch_tc_fwd<__nv_bfloat16>(p, stream)
                                       : launch_tc_fwd<__half>(p, stream);
  }
  switch (p.dtype) {
    case DType::kFloat32: return launch_simt_fwd<float>(p, stream);
    case DType::kFloat64: return launch_simt_fwd<double>(p, stream);
    case DType::kBFloat16: return launch_simt_fwd<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_simt_fwd<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t prefill_bwd(const PrefillParams& p, cudaStream_t stream) {
  if (!prefill_supported(p.dtype, p.head_dim)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen == 0) return cudaSuccess;
  if (!prefill_grid_fits(p.batch, p.heads_q, p.seqlen)) return cudaErrorInvalidConfiguration;
  if (!workspace_ok(p, prefill_bwd_workspace_bytes(p))) return cudaErrorInvalidValue;
  if (tc_bwd_eligible(p)) {
    const cudaError_t err = p.dtype == DType::kBFloat16 ? launch_tc_bwd<__nv_bfloat16>(p, stream)
                                                        : launch_tc_bwd<__half>(p, stream);
    // NotSupported comes back before anything was enqueued (not enough shared memory).
    if (err != cudaErrorNotSupported) return err;
  }
  switch (p.dtype) {
    case DType::kFloat32: return launch_simt_bwd<float>(p, stream);
    case DType::kFloat64: return launch_simt_bwd<double>(p, stream);
    case DType::kBFloat16: return launch_simt_bwd<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_simt_bwd<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace selattn::cuda
