// SIMT prefill bwd for __half (every head dim 1..256); one dtype per file so builds parallelise.
#include "cuda/prefill_simt_bwd.cuh"

namespace selattn::cuda {
template cudaError_t launch_simt_bwd<__half>(const PrefillParams&, cudaStream_t);
}  // namespace selattn::cuda
