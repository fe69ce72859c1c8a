// Decode kernels for __nv_bfloat16 (all head dims); see decode_kernels.cuh.
#include "cuda/decode_kernels.cuh"

namespace selattn::cuda::decode {

cudaError_t launch_bf16(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  return launch_for_head_dim<__nv_bfloat16>(p, ws, stream);
}

}  // namespace selattn::cuda::decode
