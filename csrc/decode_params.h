// Plain description of one pruned-KV-cache step (decode, c = 1, or chunked prefill, c > 1),
// shared by the CPU kernel, the CUDA kernels and csrc/ops.cpp. Torch-free on purpose.
//
// Semantics (shared/DESIGN.md §3), per sequence b with m = lengths[b] (or chunk) new tokens at
// positions L .. L+m-1, L = seq_len[b]:
//   1. the new tokens join the cache C with F = 0;
//   2. new query t attends to every j in C with pos(j) <= L+t, with logits
//        scale * q_h[t] . k_{h/g}[j] - (F_j + sum_{t' < t} S[t', j]);
//   3. F_j += sum_{t < m} S[t, j],  S[t, j] = relu(scale * q_sel[t] . k_sel[j]) if
//      0 < pos(j) < L+t else 0, q_sel = q[:, sel_head], k_sel = cached k of kv head sel_head/g;
//   4. evict every j != BOS with F_j > tau (if has_tau), then while |C| > budget evict the
//      largest F_j (j != BOS), ties to the oldest position; seq_len[b] += m.
// Output rows t >= m are zero.
#pragma once

#include <cstddef>
#include <cstdint>

#include "prefill_params.h"  // DType, dtype_size

namespace selattn {

struct DecodeParams {
  DType dtype;        // of q, k_new, v_new, k_cache, v_cache and out
  int64_t batch;      // B
  int64_t heads_q;    // Hq
  int64_t heads_kv;   // Hkv, divides Hq
  int64_t chunk;      // c, new tokens per sequence in this step (<= slots - budget)
  int64_t head_dim;   // D
  int64_t slots;      // cache slots per sequence (budget + max_chunk)
  int64_t budget;     // >= 1
  int64_t sel_head;   // in [0, Hq)
  double scale;
  bool has_tau;
  double tau;

  // Strides in elements; the last (head_dim) dimension is contiguous.
  const void* q;  // (B, Hq, c, D)
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  const void* k_new;  // (B, Hkv, c, D)
  int64_t k_new_batch_stride, k_new_head_stride, k_new_row_stride;
  const void* v_new;  // (B, Hkv, c, D)
  int64_t v_new_batch_stride, v_new_head_stride, v_new_row_stride;
  void* k_cache;  // (B, Hkv, slots, D)
  int64_t k_cache_batch_stride, k_cache_head_stride, k_cache_row_stride;
  void* v_cache;  // (B, Hkv, slots, D)
  int64_t v_cache_batch_stride, v_cache_head_stride, v_cache_row_stride;
  void* out;  // (B, Hq, c, D)
  int64_t out_batch_stride, out_head_stride, out_row_stride;

  // Contiguous cache state. f is float (double when dtype is kFloat64).
  void* f;               // (B, slots)
  int64_t* pos;          // (B, slots), -1 marks a free slot
  int64_t* seq_len;      // (B,)
  const int64_t* lengths;  // (B,) valid new tokens per sequence in [0, c], or null (all c)

  // Device scratch owned by the caller (CUDA); size from cuda::decode_workspace_bytes.
  void* workspace;
  size_t workspace_bytes;
  // CUDA: multiprocessors of the device (sizes the split-KV grid). Queried once by the caller
  // and cached, never per step (a step must stay free of host-side device queries); <= 0
  // means an H100's 132.
  int num_sms;
  // Key columns per split-KV CTA; 0 (the default) lets the plan choose. Tests only.
  int64_t split_cols;
};

}  // namespace selattn
