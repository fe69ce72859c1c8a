// Host-side interface between the launcher (prefill/launch.cu) and the kernel instantiations
// (instantiations/prefill_simt_*.cu, instantiations/prefill_tc_*.cu): workspace layouts and
// the launch functions. Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>

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

// Bounded workspace (DESIGN §4): the query blocks run in superchunks of superchunk_blocks(p)
// consecutive 32-row blocks; only one superchunk's Poff rows exist at a time, and a running
// column sum (B x N, the "carry") links one superchunk to the next. The block count is a
// multiple of 4, so a 128-row tensor-core forward tile (and a 64-row backward one) never
// straddles two superchunks, and is chosen so that one
// superchunk's Poff, B * blocks * N accumulators, stays within max(size of q, 64 MiB) (two
// four blocks are the minimum; only when 4 * B * N accumulators alone exceed that cap, i.e.
// heads_q * head_dim * element size < 16 bytes, does the workspace exceed it). N <= 64K at
// B = 1, Hq = 32, D = 128 runs as one superchunk. SELATTN_CUDA_SUPERCHUNK_BLOCKS=n forces n
// blocks (rounded down to a multiple of 4, at least 4): the tests of the carry.
constexpr size_t kPoffCapFloor = size_t(64) << 20;

inline int64_t superchunk_blocks(const PrefillParams& p) {
  const int64_t nqb = num_sel_blocks(p.seqlen);
  int64_t blocks = 0;
  if (const char* env = std::getenv("SELATTN_CUDA_SUPERCHUNK_BLOCKS"); env != nullptr && *env) {
    blocks = std::atoll(env);
  } else {
    const size_t q_bytes = size_t(p.batch) * size_t(p.heads_q) * size_t(p.seqlen) *
                           size_t(p.head_dim) * dtype_size(p.dtype);
    const size_t cap = q_bytes > kPoffCapFloor ? q_bytes : kPoffCapFloor;
    const size_t row = size_t(p.batch) * size_t(p.seqlen) * accum_bytes(p.dtype);
    blocks = row == 0 ? nqb : int64_t(cap / row);
  }
  blocks = blocks < 4 ? 4 : blocks & ~int64_t(3);
  return blocks < nqb ? blocks : nqb;
}

inline int64_t num_superchunks(const PrefillParams& p) {
  const int64_t per = superchunk_blocks(p);
  return per > 0 ? (num_sel_blocks(p.seqlen) + per - 1) / per : 0;
}

// Query blocks [begin, end) (32-row units) of one superchunk; `stride` = Poff rows per batch
// element in the workspace (superchunk_blocks). Poff of block I is row I - begin.
struct SuperChunk {
  int64_t begin, end, stride;
};

// Poff of one superchunk, (B, superchunk_blocks, N) in the accumulator type: for query block I
// and key j, the sum of S[k][j] over all rows k before the block.
inline size_t poff_bytes(const PrefillParams& p) {
  return align256(size_t(p.batch) * size_t(superchunk_blocks(p)) * size_t(p.seqlen) *
                  accum_bytes(p.dtype));
}

// The carry between superchunks: (B, N) doubles whatever the dtype. The backward walks the
// superchunks last to first and so subtracts column sums from it: in fp32 that would leave F
// of the lower rows with absolute errors of the order of ulp(F of the last rows); in fp64 the
// Poff rows rounded from it get (nearly always) the forward's fp32 bits.
inline size_t carry_bytes(const PrefillParams& p) {
  return align256(size_t(p.batch) * size_t(p.seqlen) * sizeof(double));
}

// Backward workspace, byte offsets. Everything after `poff` and `dl` is an accumulator that is
// zeroed before the kernels run and converted into the outputs afterwards.
struct BwdLayout {
  size_t poff, carry, dl;                 // Poff, carry; Dl = rowsum(dout*out) - dlse, (B, Hq, N)
  size_t dq, dk, dv, dq_sel, dk_sel;      // contiguous (B,Hq,N,D), (B,Hkv,N,D) x2, (B,N,D) x2
                                          // (varlen: (Hq, total_rows), (Hq, total_rows, D), ...)
  size_t dsuf;                            // dF suffix sums per (b, h, key) between superchunks
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
  l.carry = off, off += carry_bytes(p);
  l.dl = off, off += align256(bn * size_t(p.heads_q) * a);
  l.accum_begin = off;
  l.dq = off, off += align256(bn * size_t(p.heads_q) * d * a);
  l.dk = off, off += align256(bn * size_t(p.heads_kv) * d * a);
  l.dv = off, off += align256(bn * size_t(p.heads_kv) * d * a);
  l.dq_sel = off, off += align256(bn * d * a);
  l.dk_sel = off, off += align256(bn * d * a);
  l.dsuf = off, off += align256(bn * size_t(p.heads_q) * a);
  l.total = off;
  return l;
}

// Forward workspace: Poff of one superchunk, then the carry.
inline size_t fwd_workspace_bytes(const PrefillParams& p) { return poff_bytes(p) + carry_bytes(p); }

// Defined for T in {float, double, __nv_bfloat16, __half} by prefill_simt_{fwd,bwd}_*.cu.
// They assume p.workspace holds fwd_workspace_bytes(p) (forward) or bwd_layout(p).total
// (backward).
template <typename T>
cudaError_t launch_simt_fwd(const PrefillParams& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_simt_bwd(const PrefillParams& p, cudaStream_t stream);

// Tensor-core forward, T in {__nv_bfloat16, __half}, kD in {32, 64, 96, 128}, defined by
// prefill_tc_fwd_hdim<kD>_<dtype>.cu. Needs fwd_workspace_bytes(p) of workspace and 16-byte aligned rows
// of q, k, v, q_sel, k_sel (the launcher checks).
template <typename T, int kD>
cudaError_t launch_tc_fwd_hdim(const PrefillParams& p, cudaStream_t stream);

// Tensor-core backward, same T and kD, defined by prefill_tc_bwd_hdim<kD>_<dtype>.cu. Needs
// bwd_layout(p).total of workspace and 16-byte aligned rows of q, k, v, q_sel, k_sel, dout.
template <typename T, int kD>
cudaError_t launch_tc_bwd_hdim(const PrefillParams& p, cudaStream_t stream);

}  // namespace selattn::cuda
