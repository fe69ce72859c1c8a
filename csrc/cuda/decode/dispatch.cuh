// Launch of one pruned-KV-cache step (torch-free): the attend kernel (the tensor-core one of
// tc_attend.cuh for bf16/fp16 chunks at head dims <= 128, attend_kernel otherwise), then
// finish_kernel. Instantiated per element type in csrc/cuda/instantiations/decode_<dtype>.cu.
#pragma once

#include "cuda/decode/kernels.cuh"
#include "cuda/decode/tc_attend.cuh"

namespace selattn::cuda::decode {

// ---- launch ---------------------------------------------------------------------------------

// The attend step: tensor cores for bf16/fp16 chunks at head dims <= 128, SIMT otherwise.
template <typename T, int D>
cudaError_t launch_attend(const DecodeParams& p, const Workspace& ws, dim3 grid,
                          cudaStream_t stream) {
  if constexpr (kTcAttend<T, D>)
    if (p.chunk > 1) return launch_attend_tc<T, D>(p, ws, grid, stream);
  return launch_kernel(attend_kernel<T, D>, grid, dim3(kAttendThreads), Tile<T, D>::kBytes,
                       stream, p, ws);
}

template <typename T, int D>
cudaError_t launch(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  const dim3 attend_grid(static_cast<unsigned>(ws.splits), static_cast<unsigned>(p.heads_kv),
                         static_cast<unsigned>(p.batch));
  const cudaError_t err = launch_attend<T, D>(p, ws, attend_grid, stream);
  if (err != cudaSuccess) return err;
  const int64_t rows = p.heads_q * p.chunk;
  const dim3 finish_grid(
      static_cast<unsigned>(1 + (rows + kFinishRowsPerBlock - 1) / kFinishRowsPerBlock),
      static_cast<unsigned>(p.batch));
  return launch_kernel(finish_kernel<T, D>, finish_grid, dim3(kFinishThreads), 0, stream, p, ws);
}

template <typename T>
cudaError_t launch_for_head_dim(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch<T, 32>(p, ws, stream);
    case 64: return launch<T, 64>(p, ws, stream);
    case 96: return launch<T, 96>(p, ws, stream);
    case 128: return launch<T, 128>(p, ws, stream);
    case 256: return launch<T, 256>(p, ws, stream);
    default: return cudaErrorInvalidValue;
  }
}

// One per element type, each in its own translation unit (decode_<dtype>.cu) so the four
// instantiation sets compile in parallel.
cudaError_t launch_fp32(const DecodeParams& p, const Workspace& ws, cudaStream_t stream);
cudaError_t launch_fp64(const DecodeParams& p, const Workspace& ws, cudaStream_t stream);
cudaError_t launch_bf16(const DecodeParams& p, const Workspace& ws, cudaStream_t stream);
cudaError_t launch_fp16(const DecodeParams& p, const Workspace& ws, cudaStream_t stream);

}  // namespace selattn::cuda::decode
