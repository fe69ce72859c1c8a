// SIMT prefill fwd for __half (every head dim 1..256); one dtype per file so builds parallelise.
#include "cuda/prefill_simt_fwd.cuh"

namespace selattn::cuda {
template cudaError_t launch_simt_fwd<__half>(const PrefillParams&, cudaStream_t);
}  // namespace selattn::cuda
