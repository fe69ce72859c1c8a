// Tensor-core prefill backward, head dim 128, __half; one (head dim, dtype) per file so builds
// parallelise.
#include "cuda/prefill_tc_bwd.cuh"

namespace selattn::cuda {
template cudaError_t launch_tc_bwd_hdim<__half, 128>(const PrefillParams&, cudaStream_t);
}  // namespace selattn::cuda
