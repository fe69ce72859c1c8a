// CUDA launchers of one pruned-KV-cache step (torch-free). csrc/ops.cpp validates arguments,
// allocates the output, hands over the workspace (a SelectiveKVCache's, reused every step),
// fills DecodeParams and calls these on the current stream. Kernels: csrc/cuda/decode/kernels.cuh,
// instantiated in csrc/cuda/instantiations/decode_*.cu.
#pragma once

#include <cuda_runtime_api.h>

#include "decode_params.h"

namespace selattn::cuda {

// True when decode kernels are instantiated for this element type and head dim.
bool decode_supported(DType dtype, int64_t head_dim);

// Scratch the step needs in p.workspace (bytes): a pure function of the shapes, the dtype and
// p.num_sms (no device query), so a cache can size its workspace once.
size_t decode_workspace_bytes(const DecodeParams& p);

// Enqueues the step on `stream`: two kernel launches, no allocation, no host synchronisation
// and no device query (CUDA-graph capturable). Returns the launch status.
cudaError_t decode_step(const DecodeParams& p, cudaStream_t stream);

}  // namespace selattn::cuda
