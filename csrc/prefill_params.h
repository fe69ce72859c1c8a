// Plain description of one selective-attention prefill call (forward and backward), shared by
// the CPU kernels, the CUDA kernels and csrc/ops.cpp. Torch-free on purpose: kernel files
// include only this, so they compile fast and stay framework-agnostic.
//
// Semantics (shared/DESIGN.md §1): for query i, key j <= i and head h,
//   A[i,j] = scale * q_sel[i] . k_sel[j]
//   S[i,j] = relu(A[i,j]) if 1 <= j < i else 0
//   F[i,j] = sum_{k < i} S[k,j]
//   L_h[i,j] = scale * q[h,i] . k[h/g,j] - F[i,j]        (g = heads_q / heads_kv)
//   out[h,i] = softmax_j(L_h[i,:]) @ v[h/g],  lse[h,i] = logsumexp_j L_h[i,:]
#pragma once

#include <cstddef>
#include <cstdint>

namespace selattn {

// Element type of q, k, v, q_sel, k_sel, out and all gradients. Accumulation is fp32, or fp64
// for kFloat64; lse / dlse are float (double for kFloat64).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

struct PrefillParams {
  DType dtype;
  int64_t batch;     // B
  int64_t heads_q;   // Hq
  int64_t heads_kv;  // Hkv, divides Hq
  int64_t seqlen;    // N (queries and keys; always causal)
  int64_t head_dim;  // D (q, k, v, q_sel, k_sel share it)
  double scale;      // s, used for both the attention logits and the selection logits

  // All strides are in elements; the last (head_dim) dimension is contiguous.
  // 4-D tensors are (B, H, N, D); the selection tensors are (B, N, D).
  const void* q;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  const void* k;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  const void* v;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  const void* q_sel;
  int64_t q_sel_batch_stride, q_sel_row_stride;
  const void* k_sel;
  int64_t k_sel_batch_stride, k_sel_row_stride;

  // Forward outputs; inputs of the backward.
  void* out;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  void* lse;  // (B, Hq, N) contiguous

  // Backward only. dlse may be null (lse not used by the loss).
  const void* dout;
  int64_t dout_batch_stride, dout_head_stride, dout_row_stride;
  const void* dlse;  // (B, Hq, N) contiguous, or null
  void* dq;
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  void* dk;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  void* dv;
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;
  void* dq_sel;
  int64_t dq_sel_batch_stride, dq_sel_row_stride;
  void* dk_sel;
  int64_t dk_sel_batch_stride, dk_sel_row_stride;

  // Device scratch owned by the caller (CUDA): size from the *_workspace_bytes query of the
  // device's launcher. Contents on entry are unspecified; kernels initialise what they use.
  void* workspace;
  size_t workspace_bytes;

  // Auxiliary memory loss of the paper (selattn_ext/memory.py), optional:
  //   mem[b, i] = R[b, i] = sum_{j <= i} min(F[b, i, j], mem_tau)
  // Forward: written when mem_tau > 0 and mem != nullptr ((B, N) contiguous, lse's dtype).
  // Backward: when mem_tau > 0 and dmem != nullptr ((B, N) contiguous), dF[i, j] gains
  // dmem[b, i] * [F[i, j] < mem_tau] (0 at the clip, like relu's 0 at its kink), once per
  // batch element, not per head. Appended last so positional initialisers elsewhere still hold.
  double mem_tau;
  void* mem;
  const void* dmem;

  // Packed ragged batches (varlen, DESIGN §1.1; CUDA only: the CPU path runs one dense call
  // per sequence and leaves these zero). cu_seqlens == nullptr: dense. Otherwise a device
  // int32 array (batch + 1,): sequence b is rows [cu_seqlens[b], cu_seqlens[b + 1]) of the
  // packed tensors; seqlen is an upper bound of the lengths (grids and the pre-pass workspace
  // are sized by it); every batch stride is 0 and the row strides step through the packed
  // rows; lse and dlse are (Hq, total_rows) and mem and dmem (total_rows,), contiguous.
  const int32_t* cu_seqlens;
  int64_t total_rows;
};

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}

}  // namespace selattn
