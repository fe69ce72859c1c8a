// Host-side interface between the launcher (prefill/launch.cu) and the kernel instantiations
// (instantiations/prefill_simt_*.cu, instantiations/prefill_tc_*.cu): workspace layouts and
// the launch functions. Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "prefill_params.h"

// Usable from kernels too when compiled by nvcc.
#ifdef __CUDACC__
#define SELATTN_HOST_DEVICE __host__ __device__
#else
#define SELATTN_HOST_DEVICE
#endif

namespace selattn::cuda {

// Rows per query block of the selection pre-pass (= the SIMT tile). Poff for coarser blocks
// that are multiples of it is Poff at block index row0 / kSelBlockRows.
constexpr int64_t kSelBlockRows = 32;

inline size_t align256(size_t x) { return (x + 255) & ~size_t(255); }
inline size_t accum_bytes(DType t) { return t == DType::kFloat64 ? 8 : 4; }
SELATTN_HOST_DEVICE inline int64_t num_sel_blocks(int64_t n) { return (n + kSelBlockRows - 1) / kSelBlockRows; }

// Poff (B, ceil(N/32), N) in the accumulator type: for query block I and key j, the sum of
// S[k][j] over all rows k before the block.
inline size_t poff_bytes(const PrefillParams& p) {
  return align256(size_t(p.batch) * size_t(num_sel_blocks(p.seqlen)) * size_t(p.seqlen) *
                  accum_bytes(p.dtype));
}

// Backward workspace, byte offsets. Everything after `poff` and `dl` is an accumulator that is
// zeroed before the kernels run and converted into the outputs afterwards.
struct BwdLayout {
  size_t poff, dl;                        // Poff; Dl = rowsum(dout*out) - dlse, (B, Hq, N)
  size_t dq, dk, dv, dq_sel, dk_sel;      // contiguous (B,Hq,N,D), (B,Hkv,N,D) x2, (B,N,D) x2
                                          // (varlen: (Hq, total_rows), (Hq, total_rows, D), ...)
  size_t accum_begin, total;
};

inline BwdLayout bwd_layout(const PrefillParams& p) {
  const size_t a = accum_bytes(p.dtype);
  // Positions: B * N dense; the packed rows for varlen (the accumulators are (H, total_rows)).
  const size_t bn = p.cu_seqlens ? size_t(p.total_rows) : size_t(p.batch) * size_t(p.seqlen);
  const size_t d = size_t(p.head_dim);
  BwdLayout l{};
  size_t off = 0;
  l.poff = off, off += poff_bytes(p);
  l.dl = off, off += align256(bn * size_t(p.heads_q) * a);
  l.accum_begin = off;
  l.dq = off, off += align256(bn * size_t(p.heads_q) * d * a);
  l.dk = off, off += align256(bn * size_t(p.heads_kv) * d * a);
  l.dv = off, off += align256(bn * size_t(p.heads_kv) * d * a);
  l.dq_sel = off, off += align256(bn * d * a);
  l.dk_sel = off, off += align256(bn * d * a);
  l.total = off;
  return l;
}

// Defined for T in {float, double, __nv_bfloat16, __half} by prefill_simt_{fwd,bwd}_*.cu.
// They assume p.workspace holds poff_bytes(p) (forward) or bwd_layout(p).total (backward).
template <typename T>
cudaError_t launch_simt_fwd(const PrefillParams& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_simt_bwd(const PrefillParams& p, cudaStream_t stream);

// Tensor-core forward, T in {__nv_bfloat16, __half}, kD in {32, 64, 96, 128}, defined by
// prefill_tc_fwd_hdim<kD>_<dtype>.cu. Needs poff_bytes(p) of workspace and 16-byte aligned rows
// of q, k, v, q_sel, k_sel (the launcher checks).
template <typename T, int kD>
cudaError_t launch_tc_fwd_hdim(const PrefillParams& p, cudaStream_t stream);

// Tensor-core backward, same T and kD, defined by prefill_tc_bwd_hdim<kD>_<dtype>.cu. Needs
// bwd_layout(p).total of workspace and 16-byte aligned rows of q, k, v, q_sel, k_sel, dout.
template <typename T, int kD>
cudaError_t launch_tc_bwd_hdim(const PrefillParams& p, cudaStream_t stream);

}  // namespace selattn::cuda
