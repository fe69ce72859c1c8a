// SIMT prefill backward for every dtype and head dims 1..256 (DESIGN §2).
//
// One CTA per (key block of 32 keys, q head, batch) walks the query blocks from the last down
// to its own. Per (query block, key block) tile it recomputes S, F (Poff + in-block cumsum),
// P = exp(scale q.k - F - lse) and dP = dout . v, then
//   dL = P * (dP - Dl),   Dl[i] = rowsum(dout * out)[i] - dlse[i]
//   dv += P^T dout,  dk += scale dL^T q,  dq += scale dL k             (standard flash bwd)
//   dA[k][j] = [S[k][j] > 0] * dS[k][j],  dS[k][j] = -sum_{i > k} dL[i][j]
//   dk_sel += scale dA^T q_sel,  dq_sel += scale dA k_sel               (the path through F)
// dS needs a suffix sum of dL over all later query rows for this CTA's keys: because the CTA
// walks the query blocks backwards, warp 0 keeps that suffix sum in a register per key. The
// sum is per head (F's gradient is linear in each head's dL), so no cross-head reduction.
//
// The auxiliary memory loss (p.dmem) adds dmem[b][i] * [F[i][j] < mem_tau] (j <= i) to dF once
// per batch element: only the head-0 CTAs fold it into that suffix sum (and so into dA), since
// the dq_sel / dk_sel contributions of all heads are summed. Warp 0 lane c, which builds F's
// column c, keeps the tile's 32 clip tests as bits of a register for its own suffix walk.
//
// Every gradient is accumulated in fp32 (fp64) workspace buffers with atomics (dq, dq_sel from
// many key blocks; dk, dv from the heads of a GQA group; dk_sel from every head) and converted
// into the output tensors by store_accumulated_kernel afterwards.
//
// Superchunks (dispatch.h): one launch per superchunk of query blocks, last to first, each
// CTA walking only that superchunk's blocks; the per-key dF suffix sum is handed from one launch
// to the next through the workspace (dsuf), the key-side sums are added by atomics per launch.
// Before the first launch the pre-pass runs forward over all lower superchunks (same additions
// as the forward's, so the top superchunk's Poff has the forward's bits); each later superchunk
// retreats the carry by its own column sums (another rounding than the forward's: F, and so P,
// of lower superchunks can differ from the forward's in the last bits).
//
// Varlen (p.cu_seqlens): the main kernels resolve each batch element's rows (seq_rows) and
// exit in CTAs past its end; the per-row prologue and epilogue kernels need no sequence
// boundaries and run over the packed rows as one sequence of total_rows (packed_as_one).
// Torch-free.
#pragma once

#include "cuda/prefill/prepass.cuh"

namespace selattn::cuda {

// Dl[b][h][i] = sum_d dout[i][d] * out[i][d] - dlse[i] (dlse may be null). One warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    softmax_grad_rowsum_kernel(const PrefillParams p, acc_t<T>* __restrict__ dl) {
  using A = acc_t<T>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;  // over (b, h, i)
  const int64_t n = p.seqlen;
  if (row >= p.batch * p.heads_q * n) return;  // warp-uniform; no barriers in this kernel
  const int64_t i = row % n, bh = row / n;
  const int64_t h = bh % p.heads_q, b = bh / p.heads_q;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride +
                  h * p.dout_head_stride + i * p.dout_row_stride;
  const T* out = static_cast<const T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
                 i * p.out_row_stride;
  A sum = A(0);
  for (int d = lane; d < p.head_dim; d += 32) sum += A(to_acc(dout[d])) * A(to_acc(out[d]));
  sum = warp_sum(sum);
  if (lane == 0) dl[row] = sum - (p.dlse ? static_cast<const A*>(p.dlse)[row] : A(0));
}

// Workspace accumulators of one backward call, contiguous, in the accumulator type.
template <typename A>
struct BwdAccum {
  const A* poff;  // (B, superchunk_blocks, N): one superchunk
  const A* dl;    // (B, Hq, N)
  A* dq;          // (B, Hq, N, D)
  A* dk;          // (B, Hkv, N, D)
  A* dv;          // (B, Hkv, N, D)
  A* dq_sel;      // (B, N, D)
  A* dk_sel;      // (B, N, D)
  A* dsuf;        // (B, Hq, N): dF suffix sum per key, handed between superchunk launches
};

// One CTA's rows of the saved statistics and of the workspace: lse, dL, dq of (b, q head h);
// dk, dv of (b, kv head hk); dq_sel, dk_sel of b. Both backward kernels
// (SIMT and tensor-core) index through this, dense or varlen (stats_offset). d = head_dim
// (the tensor-core kernel passes its compile-time kD, which saves registers).
template <typename A>
struct BwdRows {
  const A *lse, *dl;
  A *dq, *dk, *dv, *dq_sel, *dk_sel;
};

template <typename A>
__device__ __forceinline__ BwdRows<A> bwd_rows(const PrefillParams& p, const BwdAccum<A>& ws,
                                               int64_t b, int64_t h, int64_t hk, SeqRows rows,
                                               int64_t d) {
  const int64_t qrow = stats_offset(p, b, h, p.heads_q, rows);
  const int64_t kvrow = stats_offset(p, b, hk, p.heads_kv, rows);
  const int64_t selrow = stats_offset(p, b, 0, 1, rows);
  return {static_cast<const A*>(p.lse) + qrow, ws.dl + qrow, ws.dq + qrow * d,
          ws.dk + kvrow * d, ws.dv + kvrow * d, ws.dq_sel + selrow * d,
          ws.dk_sel + selrow * d};
}

// kDirect: add the key-side partial sums to the workspace after every tile instead of keeping
// them in registers (3 x 4 x kNumChunks fp64 accumulators per thread spill from head_dim 65 on).
template <typename T, int kNumChunks, bool kDirect>
__global__ void __launch_bounds__(kThreads, 1)
    simt_bwd_kernel(const PrefillParams p, const BwdAccum<acc_t<T>> ws, const SuperChunk sc) {
  using A = acc_t<T>;
  // xs/ys: staged chunks; s_tile: S, then dA; p_tile: F, then P; dl_tile: dL.
  SELATTN_SHARED(xs, SmemTile<A>);
  SELATTN_SHARED(ys, SmemTile<A>);
  SELATTN_SHARED(s_tile, SmemTile<A>);
  SELATTN_SHARED(p_tile, SmemTile<A>);
  SELATTN_SHARED(dl_tile, SmemTile<A>);
  const int head_dim = int(p.head_dim);
  const int64_t kb = blockIdx.x;  // small kb = most query blocks: first, for tail balance
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const int64_t col0 = kb * kTile;
  const SeqRows rows = seq_rows(p, b);
  const int64_t n = rows.n;
  if (col0 >= n) return;  // past this sequence (varlen): uniform, before any barrier
  const int64_t nqb = num_sel_blocks(n);  // this sequence's query blocks
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const A scale = A(p.scale);
  const bool add_mem = h == 0 && p.dmem != nullptr && p.mem_tau > 0;
  const A mem_tau = A(p.mem_tau);
  const A* dmem =
      add_mem ? static_cast<const A*>(p.dmem) + stats_offset(p, b, 0, 1, rows) : nullptr;

  const auto [q, k, v, q_sel, k_sel] = seq_inputs<T>(p, b, h, hk, rows);
  const T* dout = seq_dout<T>(p, b, h, rows);
  const auto [lse, dl_row, dq, dk, dv, dq_sel, dk_sel] = bwd_rows(p, ws, b, h, hk, rows, head_dim);

  // Key-side accumulators: thread owns keys col0 + warp + 8u, head-dim columns kc * 32 + lane.
  constexpr int kHeld = kDirect ? 1 : kNumChunks;
  A dv_acc[kRowsPerThread][kHeld], dk_acc[kRowsPerThread][kHeld], dks_acc[kRowsPerThread][kHeld];
#pragma unroll
  for (int u = 0; u < kRowsPerThread; ++u)
#pragma unroll
    for (int kc = 0; kc < kHeld; ++kc) dv_acc[u][kc] = dk_acc[u][kc] = dks_acc[u][kc] = A(0);

  // Warp 0, lane c: sum of dL[i][col0 + c] over the rows already walked (earlier launches'
  // superchunks included).
  A* dsuf = ws.dsuf + stats_offset(p, b, h, p.heads_q, rows) + col0 + lane;
  A dl_suffix = warp == 0 && col0 + lane < n ? *dsuf : A(0);

  const int64_t qb_last = kb > sc.begin ? kb : sc.begin;
  const int64_t qb_end = sc.end < nqb ? sc.end : nqb;  // varlen: this sequence's blocks only
  if (qb_end <= qb_last) return;  // no query block of this sequence here (uniform per CTA)
  for (int64_t qb = qb_end - 1; qb >= qb_last; --qb) {
    const int64_t row0 = qb * kTile;
    const A* poff_block = ws.poff + (b * sc.stride + qb - sc.begin) * p.seqlen;

    // S tile.
    selection_tile<kNumChunks>(s_tile, xs, ys, q_sel, p.q_sel_row_stride, k_sel,
                               p.k_sel_row_stride, row0, col0, n, head_dim, scale);

    // F tile (into p_tile), exactly as in the forward so P matches the forward's lse.
    // below_tau bit r: F[row0 + r][j] < mem_tau with j <= row0 + r < n (memory-loss term).
    uint32_t below_tau = 0;
    if (warp == 0) {
      const int64_t j = col0 + lane;
      A run = j < n ? poff_block[j] : A(0);
      for (int r = 0; r < kTile; ++r) {
        p_tile[r][lane] = run;
        const int64_t i = row0 + r;
        if (add_mem && i < n && j <= i && run < mem_tau) below_tau |= 1u << r;
        run += s_tile[r][lane];
      }
    }
    __syncthreads();

    // P and dL. Each thread reads F at its own elements and overwrites them with P.
    A s[kRowsPerThread], dp[kRowsPerThread];
    tile_dot<kNumChunks>(s, xs, ys, q, p.q_row_stride, row0, k, p.k_row_stride, col0, n, head_dim);
    tile_dot<kNumChunks>(dp, xs, ys, dout, p.dout_row_stride, row0, v, p.v_row_stride, col0, n,
                         head_dim);
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      const int r = warp + kWarps * u;
      const int64_t i = row0 + r, j = col0 + lane;
      const bool valid = i < n && j <= i;
      const A prob = valid ? exp_acc(scale * s[u] - p_tile[r][lane] - lse[i]) : A(0);
      p_tile[r][lane] = prob;
      dl_tile[r][lane] = valid ? prob * (dp[u] - dl_row[i]) : A(0);
    }
    __syncthreads();

    // dA (into s_tile): walk rows bottom-up, so `run` is sum_{i > row} dL[i][j] = -dF (with
    // the memory term, dF[i][j] += dmem[i] for the rows in below_tau).
    if (warp == 0) {
      A run = dl_suffix;
      for (int r = kTile - 1; r >= 0; --r) {
        s_tile[r][lane] = s_tile[r][lane] > A(0) ? -run : A(0);
        run += dl_tile[r][lane];
        if ((below_tau >> r) & 1u) run -= dmem[row0 + r];  // bit set only for rows < n
      }
      dl_suffix = run;
    }
    __syncthreads();

    // Gradient GEMMs, one head-dim chunk at a time. Unrolled when the register accumulators
    // are indexed by kc (they must stay in registers); a plain loop otherwise.
#pragma unroll(kHeld)
    for (int kc = 0; kc < kNumChunks; ++kc) {
      const int d0 = kc * kTile;
      if (d0 >= head_dim) break;  // uniform
      const int d = d0 + lane;

      // Key side (sums over the tile's query rows): dv, dk from dout and q chunks.
      stage_chunk(xs, dout, p.dout_row_stride, row0, n, d0, head_dim);
      stage_chunk(ys, q, p.q_row_stride, row0, n, d0, head_dim);
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kRowsPerThread; ++u) {
        const int c = warp + kWarps * u;
        A sum_dv = A(0), sum_dk = A(0);
#pragma unroll 4  // bounded unrolling: full unrolling hoists 64 loads and exhausts registers
        for (int r = 0; r < kTile; ++r) {
          sum_dv += p_tile[r][c] * xs[r][lane];
          sum_dk += dl_tile[r][c] * ys[r][lane];
        }
        if constexpr (kDirect) {
          const int64_t j = col0 + c;
          if (j < n && d < head_dim) {
            atomicAdd(dv + j * head_dim + d, sum_dv);
            atomicAdd(dk + j * head_dim + d, scale * sum_dk);
          }
        } else {
          dv_acc[u][kc] += sum_dv;
          dk_acc[u][kc] += sum_dk;
        }
      }
      __syncthreads();

      // Key side: dk_sel from the q_sel chunk.
      stage_chunk(xs, q_sel, p.q_sel_row_stride, row0, n, d0, head_dim);
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kRowsPerThread; ++u) {
        const int c = warp + kWarps * u;
        A sum = A(0);
#pragma unroll 4
        for (int r = 0; r < kTile; ++r) sum += s_tile[r][c] * xs[r][lane];
        if constexpr (kDirect) {
          const int64_t j = col0 + c;
          if (j < n && d < head_dim) atomicAdd(dk_sel + j * head_dim + d, scale * sum);
        } else {
          dks_acc[u][kc] += sum;
        }
      }
      __syncthreads();

      // Query side (sums over the tile's keys): dq, dq_sel from k and k_sel chunks.
      stage_chunk(xs, k, p.k_row_stride, col0, n, d0, head_dim);
      stage_chunk(ys, k_sel, p.k_sel_row_stride, col0, n, d0, head_dim);
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kRowsPerThread; ++u) {
        const int r = warp + kWarps * u;
        const int64_t i = row0 + r;
        A sum_dq = A(0), sum_dqs = A(0);
#pragma unroll 4
        for (int c = 0; c < kTile; ++c) {
          sum_dq += dl_tile[r][c] * xs[c][lane];
          sum_dqs += s_tile[r][c] * ys[c][lane];
        }
        if (i < n && d < head_dim) {
          atomicAdd(dq + i * head_dim + d, scale * sum_dq);
          if (sum_dqs != A(0)) atomicAdd(dq_sel + i * head_dim + d, scale * sum_dqs);
        }
      }
      __syncthreads();  // xs/ys/tiles are rewritten by the next chunk or query block
    }
  }

  if (warp == 0 && col0 + lane < n) *dsuf = dl_suffix;
  if constexpr (!kDirect) {
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      const int64_t j = col0 + warp + kWarps * u;
      if (j >= n) continue;
#pragma unroll
      for (int kc = 0; kc < kNumChunks; ++kc) {
        const int d = kc * kTile + lane;
        if (d >= head_dim) continue;
        atomicAdd(dv + j * head_dim + d, dv_acc[u][kc]);
        atomicAdd(dk + j * head_dim + d, scale * dk_acc[u][kc]);
        atomicAdd(dk_sel + j * head_dim + d, scale * dks_acc[u][kc]);
      }
    }
  }
}

// dst[b][h][i][d] (strided, dtype T) = src[b][h][i][d] (contiguous accumulators). 3-D tensors
// pass heads = 1 and head_stride = 0.
template <typename T, typename A>
__global__ void store_accumulated_kernel(const A* __restrict__ src, T* __restrict__ dst,
                                         int64_t heads, int64_t n, int64_t head_dim,
                                         int64_t batch_stride, int64_t head_stride,
                                         int64_t row_stride, int64_t total) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = idx % head_dim;
    int64_t t = idx / head_dim;
    const int64_t i = t % n;
    t /= n;
    const int64_t h = t % heads, b = t / heads;
    store_elem(dst + b * batch_stride + h * head_stride + i * row_stride + d, src[idx]);
  }
}

template <typename T, typename A>
cudaError_t launch_store(const A* src, void* dst, int64_t batch, int64_t heads, int64_t n,
                         int64_t head_dim, int64_t batch_stride, int64_t head_stride,
                         int64_t row_stride, cudaStream_t stream) {
  const int64_t total = batch * heads * n * head_dim;
  const int64_t blocks = ceil_div(total, 256) < 65536 ? ceil_div(total, 256) : 65536;
  return launch_kernel(store_accumulated_kernel<T, A>, dim3(unsigned(blocks)), dim3(256), 0, stream,
                       src, static_cast<T*>(dst), heads, n, head_dim, batch_stride, head_stride,
                       row_stride, total);
}

template <typename A>
BwdAccum<A> bwd_accum(const PrefillParams& p) {
  const BwdLayout layout = bwd_layout(p);
  char* base = static_cast<char*>(p.workspace);
  BwdAccum<A> ws;
  ws.poff = reinterpret_cast<const A*>(base + layout.poff);
  ws.dl = reinterpret_cast<const A*>(base + layout.dl);
  ws.dq = reinterpret_cast<A*>(base + layout.dq);
  ws.dk = reinterpret_cast<A*>(base + layout.dk);
  ws.dv = reinterpret_cast<A*>(base + layout.dv);
  ws.dq_sel = reinterpret_cast<A*>(base + layout.dq_sel);
  ws.dk_sel = reinterpret_cast<A*>(base + layout.dk_sel);
  ws.dsuf = reinterpret_cast<A*>(base + layout.dsuf);
  return ws;
}

// Varlen: the packed rows as one dense sequence of total_rows rows (batch 1; the batch
// strides are already 0), for the prologue and epilogue kernels, which work row by row: the
// (B, H, N) layout of batch 1 is the (H, total_rows) layout of lse and the accumulators.
inline PrefillParams packed_as_one(const PrefillParams& p) {
  if (p.cu_seqlens == nullptr) return p;
  PrefillParams one = p;
  one.batch = 1, one.seqlen = p.total_rows, one.cu_seqlens = nullptr;
  return one;
}

// Before the main backward kernels (SIMT or tensor-core): zero the accumulators and the carry,
// Dl, then the pre-pass forward over every superchunk below the top one (only to bring the
// carry to the top superchunk's first block). kTcDim: launch_selection_prepass.
template <typename T, int kNumChunks, int kTcDim = 0>
cudaError_t bwd_prologue(const PrefillParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const BwdLayout layout = bwd_layout(p);
  char* base = static_cast<char*>(p.workspace);
  if (p.heads_q > 65535 || p.batch > 65535) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaMemsetAsync(base + layout.accum_begin, 0,
                                    layout.total - layout.accum_begin, stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(base + layout.carry, 0, carry_bytes(p), stream);
  if (err != cudaSuccess) return err;
  const PrefillParams flat = packed_as_one(p);
  const int64_t rows = flat.batch * flat.heads_q * flat.seqlen;
  err = launch_kernel(softmax_grad_rowsum_kernel<T>, dim3(unsigned(ceil_div(rows, kWarps))),
                      dim3(kThreads), 0, stream, flat, reinterpret_cast<A*>(base + layout.dl));
  for (int64_t s = 0; s + 1 < num_superchunks(p) && err == cudaSuccess; ++s)
    err = launch_selection_prepass<T, kNumChunks, kTcDim>(
        p, reinterpret_cast<A*>(base + layout.poff),
        reinterpret_cast<double*>(base + layout.carry), superchunk(p, s), CarryMode::kAdvance,
        stream);
  return err;
}

// Poff of superchunk s for the backward's walk from the last superchunk to the first.
template <typename T, int kNumChunks, int kTcDim = 0>
cudaError_t bwd_superchunk_prepass(const PrefillParams& p, int64_t s, cudaStream_t stream) {
  using A = acc_t<T>;
  const BwdLayout layout = bwd_layout(p);
  char* base = static_cast<char*>(p.workspace);
  return launch_selection_prepass<T, kNumChunks, kTcDim>(
      p, reinterpret_cast<A*>(base + layout.poff), reinterpret_cast<double*>(base + layout.carry),
      superchunk(p, s), s + 1 == num_superchunks(p) ? CarryMode::kKeep : CarryMode::kRetreat,
      stream);
}

// After the main backward kernel: accumulators -> the strided output tensors.
template <typename T>
cudaError_t bwd_epilogue(const PrefillParams& p, cudaStream_t stream) {
  const BwdAccum<acc_t<T>> ws = bwd_accum<acc_t<T>>(p);
  const PrefillParams flat = packed_as_one(p);
  const int64_t B = flat.batch, N = flat.seqlen, D = p.head_dim;
  cudaError_t err;
  if ((err = launch_store<T>(ws.dq, p.dq, B, p.heads_q, N, D, p.dq_batch_stride, p.dq_head_stride,
                             p.dq_row_stride, stream)) != cudaSuccess)
    return err;
  if ((err = launch_store<T>(ws.dk, p.dk, B, p.heads_kv, N, D, p.dk_batch_stride,
                             p.dk_head_stride, p.dk_row_stride, stream)) != cudaSuccess)
    return err;
  if ((err = launch_store<T>(ws.dv, p.dv, B, p.heads_kv, N, D, p.dv_batch_stride,
                             p.dv_head_stride, p.dv_row_stride, stream)) != cudaSuccess)
    return err;
  if ((err = launch_store<T>(ws.dq_sel, p.dq_sel, B, 1, N, D, p.dq_sel_batch_stride, 0,
                             p.dq_sel_row_stride, stream)) != cudaSuccess)
    return err;
  return launch_store<T>(ws.dk_sel, p.dk_sel, B, 1, N, D, p.dk_sel_batch_stride, 0,
                         p.dk_sel_row_stride, stream);
}

template <typename T, int kNumChunks>
cudaError_t launch_simt_bwd_chunks(const PrefillParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  cudaError_t err = bwd_prologue<T, kNumChunks>(p, stream);
  if (err != cudaSuccess) return err;
  constexpr bool kDirect = sizeof(A) == 8 && kNumChunks >= 4;
  for (int64_t s = num_superchunks(p) - 1; s >= 0; --s) {
    const SuperChunk sc = superchunk(p, s);
    err = bwd_superchunk_prepass<T, kNumChunks>(p, s, stream);
    if (err != cudaSuccess) return err;
    // Key blocks with a key before the superchunk's last row.
    const dim3 grid(unsigned(sc.end), unsigned(p.heads_q), unsigned(p.batch));
    err = launch_kernel(simt_bwd_kernel<T, kNumChunks, kDirect>, grid, dim3(kThreads), 0, stream,
                        p, bwd_accum<A>(p), sc);
    if (err != cudaSuccess) return err;
  }
  return bwd_epilogue<T>(p, stream);
}

template <typename T>
cudaError_t launch_simt_bwd(const PrefillParams& p, cudaStream_t stream) {
  switch (head_dim_chunks(p.head_dim)) {
    case 1: return launch_simt_bwd_chunks<T, 1>(p, stream);
    case 2: return launch_simt_bwd_chunks<T, 2>(p, stream);
    case 4: return launch_simt_bwd_chunks<T, 4>(p, stream);
    default: return launch_simt_bwd_chunks<T, 8>(p, stream);
  }
}

}  // namespace selattn::cuda
