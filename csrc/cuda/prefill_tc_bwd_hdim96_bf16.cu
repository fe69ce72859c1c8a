// Tensor-core prefill backward, head dim 96, __nv_bfloat16; one (head dim, dtype) per file so builds
// parallelise.
#include "cuda/prefill_tc_bwd.cuh"

namespace selattn::cuda {
template cudaError_t launch_tc_bwd_hdim<__nv_bfloat16, 96>(const PrefillParams&, cudaStream_t);
}  // namespace selattn::cuda
