// Host side of the CUDA decode step: the workspace size (the split plan is in
// decode::Workspace), the preconditions the kernels rely on (16-byte alignment), and dispatch by
// element type. Nothing here queries the device: the SM count arrives in DecodeParams.
#include "cuda/decode/launch.h"

#include <cstdint>
#include <initializer_list>

#include "cuda/decode/dispatch.cuh"

namespace selattn::cuda {
namespace {

size_t acc_size(DType t) { return t == DType::kFloat64 ? sizeof(double) : sizeof(float); }

struct Dim {
  int64_t size, stride;
};

// Every row of a (B, H, R, D) tensor starts on a 16-byte boundary (strides of size-1 dims
// are never used, so they do not count).
bool aligned16(const void* ptr, int64_t elem_size, std::initializer_list<Dim> dims) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (const Dim& d : dims)
    if (d.size > 1 && (d.stride * elem_size) % 16 != 0) return false;
  return true;
}

}  // namespace

bool decode_supported(DType, int64_t head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 96 || head_dim == 128 ||
         head_dim == 256;
}

size_t decode_workspace_bytes(const DecodeParams& p) {
  return decode::Workspace(p, acc_size(p.dtype)).bytes;
}

cudaError_t decode_step(const DecodeParams& p, cudaStream_t stream) {
  if (!decode_supported(p.dtype, p.head_dim)) return cudaErrorInvalidValue;
  if (p.batch > 65535) return cudaErrorInvalidConfiguration;
  const int64_t es = static_cast<int64_t>(dtype_size(p.dtype));
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, c = p.chunk, S = p.slots;
  if (!aligned16(p.q, es, {{B, p.q_batch_stride}, {Hq, p.q_head_stride}, {c, p.q_row_stride}}) ||
      !aligned16(p.k_new, es,
                 {{B, p.k_new_batch_stride}, {Hkv, p.k_new_head_stride}, {c, p.k_new_row_stride}}) ||
      !aligned16(p.v_new, es,
                 {{B, p.v_new_batch_stride}, {Hkv, p.v_new_head_stride}, {c, p.v_new_row_stride}}) ||
      !aligned16(p.k_cache, es, {{B, p.k_cache_batch_stride}, {Hkv, p.k_cache_head_stride},
                                 {S, p.k_cache_row_stride}}) ||
      !aligned16(p.v_cache, es, {{B, p.v_cache_batch_stride}, {Hkv, p.v_cache_head_stride},
                                 {S, p.v_cache_row_stride}}))
    return cudaErrorMisalignedAddress;
  const decode::Workspace ws(p, acc_size(p.dtype));
  if (p.workspace == nullptr || p.workspace_bytes < ws.bytes) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return decode::launch_fp32(p, ws, stream);
    case DType::kFloat64: return decode::launch_fp64(p, ws, stream);
    case DType::kBFloat16: return decode::launch_bf16(p, ws, stream);
    case DType::kFloat16: return decode::launch_fp16(p, ws, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace selattn::cuda
