// CUDA prefill launchers (declared in prefill_launch.h): workspace sizes and dispatch on dtype
// to the kernels. Every dtype and head dim 1..256 has the SIMT path (prefill_simt_*.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/prefill_launch.h"
#include "cuda/prefill_dispatch.h"

namespace selattn::cuda {

bool prefill_supported(DType dtype, int64_t head_dim) {
  const bool known_dtype = dtype == DType::kFloat32 || dtype == DType::kFloat64 ||
                           dtype == DType::kBFloat16 || dtype == DType::kFloat16;
  return known_dtype && head_dim >= 1 && head_dim <= 256;
}

size_t prefill_fwd_workspace_bytes(const PrefillParams& p) { return poff_bytes(p); }

size_t prefill_bwd_workspace_bytes(const PrefillParams& p) { return bwd_layout(p).total; }

namespace {

// Refuse rather than write out of bounds if the caller's workspace is short.
bool workspace_ok(const PrefillParams& p, size_t needed) {
  return p.workspace != nullptr && p.workspace_bytes >= needed;
}

}  // namespace

cudaError_t prefill_fwd(const PrefillParams& p, cudaStream_t stream) {
  if (!prefill_supported(p.dtype, p.head_dim)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen == 0) return cudaSuccess;
  if (!workspace_ok(p, prefill_fwd_workspace_bytes(p))) return cudaErrorInvalidValue;
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
  if (!workspace_ok(p, prefill_bwd_workspace_bytes(p))) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return launch_simt_bwd<float>(p, stream);
    case DType::kFloat64: return launch_simt_bwd<double>(p, stream);
    case DType::kBFloat16: return launch_simt_bwd<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_simt_bwd<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace selattn::cuda
