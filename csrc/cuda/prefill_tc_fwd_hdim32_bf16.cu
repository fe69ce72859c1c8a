// Tensor-core prefill forward, head dim 32, __nv_bfloat16; one (head dim, dtype) per file so builds
// parallelise.
#include "cuda/prefill_tc_fwd.cuh"

namespace selattn::cuda {
template cudaError_t launch_tc_fwd_hdim<__nv_bfloat16, 32>(const PrefillParams&, cudaStream_t);
}  // namespace selattn::cuda
