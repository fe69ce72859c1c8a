// Decode kernels for double (all head dims); see decode_kernels.cuh.
#include "cuda/decode_kernels.cuh"

namespace selattn::cuda::decode {

cudaError_t launch_fp64(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  return launch_for_head_dim<double>(p, ws, stream);
}

}  // namespace selattn::cuda::decode
