// CUDA launchers of one pruned-KV-cache step (torch-free). csrc/ops.cpp validates arguments,
// allocates the output and the workspace, fills DecodeParams and calls these on the current
// stream. Kernels: csrc/cuda/decode/kernels.cuh, instantiated in csrc/cuda/instantiations/decode_*.cu.
#pragma once

#include <cuda_runtime_api.h>

#include "decode_params.h"

namespace selattn::cuda {

// True when decode kernels are instantiated for this element type and head dim.
bool decode_supported(DType dtype, int64_t head_dim);

// Scratch the step needs in p.workspace (bytes). Depends on the current device (its SM count
// decides how many CTAs share the slots), so query it on the device that runs the step.
size_t decode_workspace_bytes(const DecodeParams& p);

// Enqueues the step on `stream` (three launches); returns the launch status.
cudaError_t decode_step(const DecodeParams& p, cudaStream_t stream);

}  // namespace selattn::cuda
