// Tensor-core prefill forward, head dim 128, __half; one (head dim, dtype) per file so builds
// parallelise.
#include "cuda/prefill_tc_fwd.cuh"

namespace selattn::cuda {
template cudaError_t launch_tc_fwd_hdim<__half, 128>(const PrefillParams&, cudaStream_t);
}  // namespace selattn::cuda
