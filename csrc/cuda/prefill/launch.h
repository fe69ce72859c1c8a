// CUDA prefill launchers (torch-free). csrc/ops.cpp validates arguments, allocates outputs and
// the workspace, fills PrefillParams and calls these on the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include "prefill_params.h"

namespace selattn::cuda {

// True when kernels are instantiated for this element type and head dim.
bool prefill_supported(DType dtype, int64_t head_dim);

// Whether the launch grids fit CUDA's limits (grid y/z <= 65535): checked before anything is
// enqueued, by ops.cpp (a clear error) and by the launchers (cudaErrorInvalidConfiguration).
bool prefill_grid_fits(int64_t batch, int64_t heads_q, int64_t seqlen);
int64_t prefill_max_seqlen();

// Scratch the launcher needs in p.workspace (bytes, 256-byte aligned start assumed).
size_t prefill_fwd_workspace_bytes(const PrefillParams& p);
size_t prefill_bwd_workspace_bytes(const PrefillParams& p);

// Enqueue on `stream`; returns the launch status (cudaGetLastError after the launches).
cudaError_t prefill_fwd(const PrefillParams& p, cudaStream_t stream);
cudaError_t prefill_bwd(const PrefillParams& p, cudaStream_t stream);

}  // namespace selattn::cuda
