// CUDA kernels of one pruned-KV-cache step (DESIGN §3; semantics in decode_params.h).
// Torch-free. Launched by decode/dispatch.cuh (instantiated per element type in
// csrc/cuda/instantiations/decode_<dtype>.cu); chunks (c > 1) in bf16/fp16 at head dims <= 128
// take the tensor-core attend kernel of decode/tc_attend.cuh instead of attend_kernel.
//
// Two launches per step, FlashAttention-2 split-KV style, no host synchronisation and no
// allocation (the workspace is the caller's), so a step can be captured in a CUDA graph. The
// new tokens are read from k_new/v_new as extra "virtual" key columns slots .. slots+c-1, so
// nothing is written to the cache until the second kernel, and no kernel races another on it:
//   1. attend: grid (splits, Hkv, B). One CTA per (column range, kv group, sequence) holds the
//      q heads of the group (rows h * c + t, in passes of kRows rows), so each K/V row is read
//      once per group. The range is streamed through shared memory in tiles of kCols columns
//      with cp.async, two stages (the next tile's 16-byte loads are in flight while this tile
//      is used). Offsets F_j + sum_{t'<t} S[t',j] are formed per tile: S (the selection head's
//      relu(q.k)) is computed where it is needed, by the CTA of the selection head's group
//      (whose running sums become the new F) and, for chunks (c > 1), by every CTA for its own
//      offsets. Each CTA writes a partial softmax state (max, sum, unnormalised output) per row.
//      For bf16/fp16 chunks at head dims <= 128, attend_tc_kernel (tc_attend.cuh) does this
//      step on the tensor cores in 64-row passes, with the same outputs and running-F protocol.
//   2. finish: grid (1 + row blocks, B). Blocks >= 1 merge the partial states into `out`;
//      block 0 commits the step for its sequence: F update, insertion of the new tokens into
//      free slots, eviction (tau, then the budget: largest F first, ties to the oldest, never
//      BOS; one block-wide radix select when a chunk evicts more than a couple) and seq_len.
//      Block 0 writes only cache state, which blocks >= 1 never read.
// The number of splits comes from the SM count the caller passes (queried once and cached).
#pragma once

#include "cuda/arch.cuh"

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "decode_params.h"

namespace selattn::cuda::decode {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kAttendThreads = 128;
constexpr int kAttendWarps = kAttendThreads / 32;
constexpr int kFinishThreads = 256;
constexpr int kFinishRowsPerBlock = kFinishThreads / 32;  // one warp per query row
constexpr int kStages = 2;                 // cp.async stages of the K/V tiles
constexpr int kMaxCols = 32;               // key columns per tile (at most)
constexpr size_t kStageBudget = 36 * 1024;  // K+V tiles of every stage, bytes
constexpr size_t kRowBudget = 4096;         // bytes of the q rows of one pass
constexpr int64_t kColsGranule = 32;        // split boundaries are multiples of this
constexpr int64_t kMinColsPerSplit = 64;    // fewer columns per CTA cost more to merge
constexpr int64_t kTargetCtasPerSm = 4;     // attend CTAs per SM to aim for (fits smem)

__host__ __device__ constexpr size_t up16(size_t x) { return (x + 15) / 16 * 16; }
__host__ __device__ constexpr int clamp_int(int x, int lo, int hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Tile shapes and the shared-memory layout of the attend kernel for (T, D).
template <typename T, int D>
struct Tile {
  using A = acc_t<T>;
  static constexpr int kElemsPerVec = 16 / static_cast<int>(sizeof(T));
  static_assert(D % kElemsPerVec == 0, "head_dim must fill whole 16-byte vectors");
  static constexpr int kVecs = D / kElemsPerVec;  // 16-byte vectors per row
  // Shared rows padded by 16 bytes: threads reading consecutive rows hit different banks.
  static constexpr int kRowBytes = D * static_cast<int>(sizeof(T)) + 16;
  static constexpr int kRows = clamp_int(static_cast<int>(kRowBudget / (D * sizeof(A))), 2, 16);
  static constexpr int kAccVecs = (kRows * kVecs + kAttendThreads - 1) / kAttendThreads;
  // Layout for n columns per tile: K/V stages, then q and q_sel [kRows][D], logits and S
  // [kRows][n], running F and positions [n], row statistics m, l, corr [kRows].
  static constexpr size_t stage_bytes(int n) { return 2 * static_cast<size_t>(n) * kRowBytes; }
  static constexpr size_t bytes_for(int n) {
    return kStages * stage_bytes(n) + 2 * up16(kRows * D * sizeof(A)) +
           2 * up16(kRows * n * sizeof(A)) + up16(n * sizeof(A)) + up16(n * sizeof(int64_t)) +
           up16(3 * kRows * sizeof(A));
  }
  // The widest tile within the stage budget whose whole layout fits the default 48 KiB.
  static constexpr int pick_cols() {
    for (int n = kMaxCols; n > 1; --n)
      if (kStages * stage_bytes(n) <= kStageBudget && bytes_for(n) <= 48 * 1024) return n;
    return 1;
  }
  static constexpr int kCols = pick_cols();
  static constexpr size_t kStageBytes = stage_bytes(kCols);
  static constexpr size_t kQAt = kStages * kStageBytes;
  static constexpr size_t kQselAt = kQAt + up16(kRows * D * sizeof(A));
  static constexpr size_t kScoreAt = kQselAt + up16(kRows * D * sizeof(A));
  static constexpr size_t kSelAt = kScoreAt + up16(kRows * kCols * sizeof(A));
  static constexpr size_t kRunAt = kSelAt + up16(kRows * kCols * sizeof(A));
  static constexpr size_t kPosAt = kRunAt + up16(kCols * sizeof(A));
  static constexpr size_t kStatAt = kPosAt + up16(kCols * sizeof(int64_t));
  static constexpr size_t kBytes = kStatAt + up16(3 * kRows * sizeof(A));
  static_assert(kBytes == bytes_for(kCols), "layout and size disagree");
  static_assert(kBytes <= 48 * 1024, "attend kernel: shared memory over the default 48 KiB");
};

// The split plan and the workspace carve-up, shared by the host (sizes) and the kernels
// (pointers). Depends on the shapes and p.num_sms only.
struct Workspace {
  int64_t ncols;           // slots + chunk
  int64_t splits, cols_per_split;
  int64_t run_slices;      // running F sums kept per sequence: 1 (decode) or Hkv (chunks)
  size_t run_at, part_m_at, part_l_at, part_acc_at, new_slot_at, bytes;

  __host__ __device__ static size_t round_up(size_t x) { return (x + 255) / 256 * 256; }

  __host__ __device__ Workspace(const DecodeParams& p, size_t acc_size) {
    ncols = p.slots + p.chunk;
    const int64_t sms = p.num_sms > 0 ? p.num_sms : 132;
    const int64_t ctas = p.batch * p.heads_kv > 0 ? p.batch * p.heads_kv : 1;
    const int64_t want = (kTargetCtasPerSm * sms + ctas - 1) / ctas;
    const int64_t most = (ncols + kMinColsPerSplit - 1) / kMinColsPerSplit;
    int64_t s = want < most ? want : most;
    s = s < 1 ? 1 : s;
    cols_per_split = ((ncols + s - 1) / s + kColsGranule - 1) / kColsGranule * kColsGranule;
    if (p.split_cols > 0) cols_per_split = p.split_cols;
    splits = (ncols + cols_per_split - 1) / cols_per_split;
    run_slices = p.chunk > 1 ? p.heads_kv : 1;
    const size_t states = static_cast<size_t>(p.batch * p.heads_q * p.chunk * splits);
    size_t at = 0;
    run_at = at, at = round_up(at + acc_size * p.batch * run_slices * ncols);
    part_m_at = at, at = round_up(at + acc_size * states);
    part_l_at = at, at = round_up(at + acc_size * states);
    part_acc_at = at, at = round_up(at + acc_size * states * p.head_dim);
    new_slot_at = at, at = round_up(at + sizeof(int64_t) * p.batch * p.chunk);
    bytes = at;
  }
  template <typename U>
  __host__ __device__ U* get(void* base, size_t at) const {
    return reinterpret_cast<U*>(static_cast<char*>(base) + at);
  }
  // Running sums of F for (b, kv head hk); slice 0 is the selection head's group: the new F.
  template <typename A>
  __host__ __device__ A* run(void* base, int64_t b, int64_t slice) const {
    return get<A>(base, run_at) + (b * run_slices + slice) * ncols;
  }
};

// ---- element conversion and 16-byte vectors ----------------------------------------------
template <typename T, typename A>
__device__ __forceinline__ void unpack(const uint4& raw, A* dst) {
  if constexpr (std::is_same_v<T, float>) {
    const float* x = reinterpret_cast<const float*>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) dst[e] = x[e];
  } else if constexpr (std::is_same_v<T, double>) {
    const double* x = reinterpret_cast<const double*>(&raw);
    dst[0] = x[0], dst[1] = x[1];
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162* x = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = __bfloat1622float2(x[e]);
      dst[2 * e] = f.x, dst[2 * e + 1] = f.y;
    }
  } else {
    const __half2* x = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = __half22float2(x[e]);
      dst[2 * e] = f.x, dst[2 * e + 1] = f.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return x;
  }
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half(x);
  } else {
    return static_cast<T>(x);
  }
}

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename A>
__device__ __forceinline__ A positive_inf() {
  if constexpr (std::is_same_v<A, double>)
    return __longlong_as_double(0x7ff0000000000000LL);
  else
    return __int_as_float(0x7f800000);
}

__device__ __forceinline__ int64_t valid_new(const DecodeParams& p, int64_t b) {
  if (p.lengths == nullptr) return p.chunk;
  const int64_t m = p.lengths[b];
  return m < 0 ? 0 : (m > p.chunk ? p.chunk : m);  // checked on the host; clamped for safety
}

template <typename T>
__device__ __forceinline__ const T* key_row(const DecodeParams& p, int64_t b, int64_t h,
                                            int64_t j) {
  if (j < p.slots)
    return static_cast<const T*>(p.k_cache) + b * p.k_cache_batch_stride +
           h * p.k_cache_head_stride + j * p.k_cache_row_stride;
  return static_cast<const T*>(p.k_new) + b * p.k_new_batch_stride + h * p.k_new_head_stride +
         (j - p.slots) * p.k_new_row_stride;
}

template <typename T>
__device__ __forceinline__ const T* value_row(const DecodeParams& p, int64_t b, int64_t h,
                                              int64_t j) {
  if (j < p.slots)
    return static_cast<const T*>(p.v_cache) + b * p.v_cache_batch_stride +
           h * p.v_cache_head_stride + j * p.v_cache_row_stride;
  return static_cast<const T*>(p.v_new) + b * p.v_new_batch_stride + h * p.v_new_head_stride +
         (j - p.slots) * p.v_new_row_stride;
}


// Dot product of an accumulator-type row in shared memory with a T row in shared memory.
template <typename T, int D>
__device__ __forceinline__ acc_t<T> dot_row(const acc_t<T>* a, const unsigned char* t_row) {
  using A = acc_t<T>;
  using L = Tile<T, D>;
  A sum = A(0);
#pragma unroll 4
  for (int vec = 0; vec < L::kVecs; ++vec) {
    A x[L::kElemsPerVec];
    unpack<T>(*reinterpret_cast<const uint4*>(t_row + vec * 16), x);
#pragma unroll
    for (int e = 0; e < L::kElemsPerVec; ++e) sum += a[vec * L::kElemsPerVec + e] * x[e];
  }
  return sum;
}

// Same, the T row read from global memory (selection keys of another kv group, chunks only).
template <typename T, int D>
__device__ __forceinline__ acc_t<T> dot_global(const acc_t<T>* a, const T* row) {
  using A = acc_t<T>;
  using L = Tile<T, D>;
  const uint4* v = reinterpret_cast<const uint4*>(row);
  A sum = A(0);
  for (int vec = 0; vec < L::kVecs; ++vec) {
    A x[L::kElemsPerVec];
    unpack<T>(__ldg(v + vec), x);
#pragma unroll
    for (int e = 0; e < L::kElemsPerVec; ++e) sum += a[vec * L::kElemsPerVec + e] * x[e];
  }
  return sum;
}

// Position of key column j for sequence b (-1: nothing there). Cached slots hold positions
// below seq_len; new token u sits at seq_len + u when u < m.
__device__ __forceinline__ int64_t column_pos(const DecodeParams& p, int64_t b, int64_t j,
                                              int64_t m, int64_t first) {
  if (j < p.slots) return p.pos[b * p.slots + j];
  return j - p.slots < m ? first + (j - p.slots) : -1;
}

// The key columns [begin, end) of one split (ws.cols_per_split each, the last one shorter),
// streamed in `tile`-column tiles: tile i starts at column start(i) and holds count(i) of them.
struct SplitCols {
  int64_t begin, end, ntiles;
  int tile;
  __device__ SplitCols(const Workspace& ws, int64_t split, int tile_cols)
      : begin(split * ws.cols_per_split),
        end(begin + ws.cols_per_split < ws.ncols ? begin + ws.cols_per_split : ws.ncols),
        ntiles((end - begin + tile_cols - 1) / tile_cols),
        tile(tile_cols) {}
  __device__ int64_t start(int64_t i) const { return begin + i * tile; }
  __device__ int count(int64_t i) const {
    return static_cast<int>(end - start(i) < tile ? end - start(i) : tile);
  }
};

// One pass of an attend CTA over its group's rows [r0, r0 + nrows) (r = t * G + g, t-major):
// its first token t_lo, the ntok tokens it touches and the nadvance tokens it finishes (whose
// S the running F takes in before the next pass).
struct RowPass {
  int nrows;
  int64_t t_lo;
  int ntok, nadvance;
};
__device__ __forceinline__ RowPass row_pass(int64_t r0, int64_t rows_total, int64_t G,
                                            int rows_per_pass) {
  RowPass rp;
  rp.nrows = static_cast<int>(rows_total - r0 < rows_per_pass ? rows_total - r0 : rows_per_pass);
  rp.t_lo = r0 / G;
  rp.ntok = static_cast<int>((r0 + rp.nrows - 1) / G + 1 - rp.t_lo);
  rp.nadvance = static_cast<int>((r0 + rp.nrows) / G - rp.t_lo);
  return rp;
}

// Offset of key column j (position pj, -1: empty) before token t_lo of a pass: on the first
// pass the cached F of a slot (0 for a new token), later the running sum left in run_g.
template <typename A>
__device__ __forceinline__ A offset_before_pass(const DecodeParams& p, int64_t j, int64_t pj,
                                                int64_t t_lo, const A* run_g, const A* f_cached) {
  return pj < 0 ? A(0) : (t_lo > 0 ? run_g[j] : (j < p.slots ? f_cached[j] : A(0)));
}

// ---- 1. split-KV attention of one kv group: partial softmax states -------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kAttendThreads)
    attend_kernel(const DecodeParams p, const Workspace ws) {
  using A = acc_t<T>;
  using L = Tile<T, D>;
  constexpr int kCols = L::kCols, kRows = L::kRows, E = L::kElemsPerVec;
  SELATTN_DYNAMIC_SHARED(smem);
  A* q_s = reinterpret_cast<A*>(smem + L::kQAt);
  A* qsel_s = reinterpret_cast<A*>(smem + L::kQselAt);
  A* sc_s = reinterpret_cast<A*>(smem + L::kScoreAt);
  A* sel_s = reinterpret_cast<A*>(smem + L::kSelAt);
  A* run_s = reinterpret_cast<A*>(smem + L::kRunAt);
  int64_t* pos_s = reinterpret_cast<int64_t*>(smem + L::kPosAt);
  A* m_s = reinterpret_cast<A*>(smem + L::kStatAt);
  A* l_s = m_s + kRows;
  A* corr_s = l_s + kRows;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int64_t G = p.heads_q / p.heads_kv, c = p.chunk;
  const int64_t m = valid_new(p, b), first = p.seq_len[b];
  const int64_t sel_kv = p.sel_head / G;
  const bool is_sel = hk == sel_kv;
  // S is needed for the new F (selection group) and for the offsets of later chunk tokens.
  const bool need_s = is_sel || c > 1;
  A* run_g = ws.run<A>(p.workspace, b, (hk - sel_kv + p.heads_kv) % p.heads_kv);
  const SplitCols cols(ws, split, kCols);
  const A scale = static_cast<A>(p.scale);
  const A* f_cached = static_cast<const A*>(p.f) + b * p.slots;

  // Issues the cp.async copies of tile i (K and V rows) into stage i % kStages. Columns past
  // the range or with nothing in them are zero-filled, so P V never meets stale bytes.
  auto issue = [&](int64_t i) {
    unsigned char* stage = smem + (i % kStages) * L::kStageBytes;
    const int64_t c0 = cols.start(i);
    for (int v = tid; v < 2 * kCols * L::kVecs; v += kAttendThreads) {
      const int which = v / (kCols * L::kVecs), rem = v % (kCols * L::kVecs);
      const int jj = rem / L::kVecs, vec = rem % L::kVecs;
      const int64_t j = c0 + jj;
      const bool valid = j < cols.end && column_pos(p, b, j, m, first) >= 0;
      const T* row = valid ? (which == 0 ? key_row<T>(p, b, hk, j) : value_row<T>(p, b, hk, j))
                           : static_cast<const T*>(p.k_cache);
      cp_async_16(stage + (which * kCols + jj) * L::kRowBytes + vec * 16,
                  reinterpret_cast<const uint4*>(row) + (valid ? vec : 0), valid);
    }
  };

  const int64_t rows_total = m * G;  // group rows r = t * G + g, t-major
  for (int64_t r0 = 0; r0 < rows_total; r0 += kRows) {
    const auto [nrows, t_lo, ntok, nadvance] = row_pass(r0, rows_total, G, kRows);
    __syncthreads();  // the previous pass is done with q_s, m_s, l_s
    for (int x = tid; x < kRows * D; x += kAttendThreads) {
      const int r = x / D, d = x % D;
      A qv = A(0);
      if (r < nrows) {
        const int64_t row = r0 + r, h = hk * G + row % G, t = row / G;
        qv = to_acc(static_cast<const T*>(p.q)[b * p.q_batch_stride + h * p.q_head_stride +
                                               t * p.q_row_stride + d]);
      }
      q_s[x] = qv;
      A qsv = A(0);
      if (need_s && r < ntok)
        qsv = to_acc(static_cast<const T*>(p.q)[b * p.q_batch_stride +
                                                p.sel_head * p.q_head_stride +
                                                (t_lo + r) * p.q_row_stride + d]);
      qsel_s[x] = qsv;
    }
    if (tid < kRows) m_s[tid] = -positive_inf<A>(), l_s[tid] = A(0), corr_s[tid] = A(1);
    A acc[L::kAccVecs][E];
#pragma unroll
    for (int k = 0; k < L::kAccVecs; ++k)
#pragma unroll
      for (int e = 0; e < E; ++e) acc[k][e] = A(0);

    if (cols.ntiles > 0) issue(0);
    cp_async_commit();
    for (int64_t i = 0; i < cols.ntiles; ++i) {
      if (i + 1 < cols.ntiles) issue(i + 1);
      cp_async_commit();  // possibly empty: keeps the group count uniform
      const int64_t c0 = cols.start(i);
      const int ncols = cols.count(i);
      if (tid < kCols) {
        const int64_t j = c0 + tid;
        const int64_t pj = tid < ncols ? column_pos(p, b, j, m, first) : -1;
        pos_s[tid] = pj;
        run_s[tid] = offset_before_pass<A>(p, j, pj, t_lo, run_g, f_cached);
      }
      cp_async_wait<1>();  // this thread's copies of tile i have landed
      __syncthreads();     // ... and everyone's
      const unsigned char* k_tile = smem + (i % kStages) * L::kStageBytes;
      const unsigned char* v_tile = k_tile + kCols * L::kRowBytes;

      if (need_s) {
        // S[t][j] for the pass's tokens: relu(scale q_sel[t].k_sel[j]) where 0 < pos(j) < L+t.
        for (int x = tid; x < ntok * kCols; x += kAttendThreads) {
          const int tt = x / kCols, jj = x % kCols;
          const int64_t pj = pos_s[jj];
          A s = A(0);
          if (pj > 0 && pj < first + t_lo + tt) {
            const A dot = is_sel ? dot_row<T, D>(qsel_s + tt * D, k_tile + jj * L::kRowBytes)
                                 : dot_global<T, D>(qsel_s + tt * D,
                                                    key_row<T>(p, b, sel_kv, c0 + jj));
            s = scale * dot > A(0) ? scale * dot : A(0);
          }
          sel_s[tt * kCols + jj] = s;
        }
        __syncthreads();
        if (tid < ncols) {
          A run = run_s[tid];
          for (int tt = 0; tt < nadvance; ++tt) run += sel_s[tt * kCols + tid];
          run_g[c0 + tid] = run;  // F before token t_lo + nadvance (the new F after the last)
        }
      }

      // Logits of the pass's rows: s q.k - (F_j + sum_{t' < t} S[t', j]), -inf where hidden.
      for (int x = tid; x < kRows * kCols; x += kAttendThreads) {
        const int r = x / kCols, jj = x % kCols;
        A logit = -positive_inf<A>();
        const int64_t pj = pos_s[jj];
        if (r < nrows && pj >= 0) {
          const int tt = static_cast<int>((r0 + r) / G - t_lo);
          if (pj <= first + t_lo + tt) {
            A off = run_s[jj];
            if (need_s)
              for (int u = 0; u < tt; ++u) off += sel_s[u * kCols + jj];
            logit = scale * dot_row<T, D>(q_s + r * D, k_tile + jj * L::kRowBytes) - off;
          }
        }
        sc_s[x] = logit;
      }
      __syncthreads();

      // Online softmax, one warp per row: new max, rescale factor, probabilities in place.
      for (int r = warp; r < nrows; r += kAttendWarps) {
        const A v = lane < kCols ? sc_s[r * kCols + lane] : -positive_inf<A>();
        A mx = v;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          const A other = __shfl_xor_sync(0xffffffffu, mx, o);
          mx = other > mx ? other : mx;
        }
        const A m_old = m_s[r];
        const A m_new = m_old > mx ? m_old : mx;
        const bool none = m_new == -positive_inf<A>();  // nothing visible so far
        const A prob = none || v == -positive_inf<A>() ? A(0) : exp_acc(v - m_new);
        const A corr = none || m_old == -positive_inf<A>() ? A(none ? 1 : 0)
                                                            : exp_acc(m_old - m_new);
        A sum = prob;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        __syncwarp();  // every lane has read m_s[r] and sc_s before they are overwritten
        if (lane < kCols) sc_s[r * kCols + lane] = prob;
        if (lane == 0) l_s[r] = l_s[r] * corr + sum, m_s[r] = m_new, corr_s[r] = corr;
      }
      __syncthreads();

      // acc = acc * corr + P V for this thread's 16-byte slices of the output rows.
#pragma unroll
      for (int k = 0; k < L::kAccVecs; ++k) {
        const int o = tid + k * kAttendThreads;
        if (o < nrows * L::kVecs) {
          const int r = o / L::kVecs, vec = o % L::kVecs;
          const A corr = corr_s[r];
#pragma unroll
          for (int e = 0; e < E; ++e) acc[k][e] *= corr;
          for (int jj = 0; jj < ncols; ++jj) {
            const A pr = sc_s[r * kCols + jj];
            A vv[E];
            unpack<T>(*reinterpret_cast<const uint4*>(v_tile + jj * L::kRowBytes + vec * 16), vv);
#pragma unroll
            for (int e = 0; e < E; ++e) acc[k][e] += pr * vv[e];
          }
        }
      }
      __syncthreads();  // this stage and sc_s/corr_s are free for the next tile
    }
    cp_async_wait<0>();  // the trailing (empty) group

    // Partial state of each row of the pass for this split.
#pragma unroll
    for (int k = 0; k < L::kAccVecs; ++k) {
      const int o = tid + k * kAttendThreads;
      if (o < nrows * L::kVecs) {
        const int r = o / L::kVecs, vec = o % L::kVecs;
        const int64_t row = r0 + r, h = hk * G + row % G, t = row / G;
        const int64_t state = ((b * p.heads_q + h) * c + t) * ws.splits + split;
        A* dst = ws.get<A>(p.workspace, ws.part_acc_at) + state * D + vec * E;
#pragma unroll
        for (int e = 0; e < E; ++e) dst[e] = acc[k][e];
      }
    }
    if (tid < nrows) {
      const int64_t row = r0 + tid, h = hk * G + row % G, t = row / G;
      const int64_t state = ((b * p.heads_q + h) * c + t) * ws.splits + split;
      ws.get<A>(p.workspace, ws.part_m_at)[state] = m_s[tid];
      ws.get<A>(p.workspace, ws.part_l_at)[state] = l_s[tid];
    }
  }
}

// ---- 2a. merge the split states into out ---------------------------------------------------

template <typename T, int D>
__device__ void combine_rows(const DecodeParams& p, const Workspace& ws, int64_t b,
                             int64_t row_block) {
  using A = acc_t<T>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = row_block * kFinishRowsPerBlock + warp;  // h * chunk + t
  if (row >= p.heads_q * p.chunk) return;
  const int64_t h = row / p.chunk, t = row % p.chunk;
  T* o = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
         t * p.out_row_stride;
  if (t >= valid_new(p, b)) {
    for (int d = lane; d < D; d += 32) o[d] = from_acc<T>(A(0));
    return;
  }
  const int64_t first_state = (b * p.heads_q * p.chunk + row) * ws.splits;
  const A* part_m = ws.get<A>(p.workspace, ws.part_m_at) + first_state;
  const A* part_l = ws.get<A>(p.workspace, ws.part_l_at) + first_state;
  const A* part_acc = ws.get<A>(p.workspace, ws.part_acc_at) + first_state * D;
  A mx = -positive_inf<A>();
  for (int64_t s = 0; s < ws.splits; ++s) mx = part_m[s] > mx ? part_m[s] : mx;
  // The query sees itself with a finite logit, so mx is finite and total >= 1.
  A total = A(0);
  for (int64_t s = 0; s < ws.splits; ++s)
    if (part_l[s] > A(0)) total += part_l[s] * exp_acc(part_m[s] - mx);
  const A inv = A(1) / total;
  for (int d = lane; d < D; d += 32) {
    A sum = A(0);
    for (int64_t s = 0; s < ws.splits; ++s)
      if (part_l[s] > A(0)) sum += part_acc[s * D + d] * exp_acc(part_m[s] - mx);
    o[d] = from_acc<T>(sum * inv);
  }
}

// ---- 2b. commit: F update, insertion, eviction ---------------------------------------------

struct Victim {
  double f;
  int64_t pos, slot;
};

// Larger F first; on equal F the older (smaller) position.
__device__ __forceinline__ bool evict_first(const Victim& a, const Victim& b) {
  if (a.slot < 0) return false;
  if (b.slot < 0) return true;
  return a.f > b.f || (a.f == b.f && a.pos < b.pos);
}

// F as unsigned bits whose order is F's numeric order (NaN as +inf, as on the CPU; -0 as +0).
__device__ __forceinline__ uint32_t order_bits(float x) {
  if (x != x) x = __int_as_float(0x7f800000);
  if (x == 0.0f) x = 0.0f;
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint64_t order_bits(double x) {
  if (x != x) x = __longlong_as_double(0x7ff0000000000000LL);
  if (x == 0.0) x = 0.0;
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// Block-wide radix select (8-bit digits, most significant first) over the slots j < S with
// in(j): the k-th (1-based) key in descending order if kLargest, else ascending. Returns that
// key and sets k to its rank among the slots holding exactly that key. One pass over the slots
// per digit, each thread touching only the slots j = tid (mod kFinishThreads).
template <bool kLargest, typename U, typename Key, typename In>
__device__ U radix_select(int64_t S, int64_t& k, Key key, In in) {
  static_assert(kFinishThreads == 256, "one histogram bin per thread");
  SELATTN_SHARED(hist, unsigned[256]);
  SELATTN_SHARED(sel, unsigned long long[2]);  // the prefix so far, the remaining rank
  const int tid = threadIdx.x;
  U prefix = 0, mask = 0;
  for (int shift = static_cast<int>(sizeof(U)) * 8 - 8; shift >= 0; shift -= 8) {
    hist[tid] = 0;
    __syncthreads();
    for (int64_t j = tid; j < S; j += kFinishThreads)
      if (in(j)) {
        const U x = key(j);
        if ((x & mask) == prefix) atomicAdd(&hist[(x >> shift) & 0xff], 1u);
      }
    __syncthreads();
    if (tid == 0) {
      int64_t rest = k;
      int digit = kLargest ? 0 : 255;
      for (int i = 0; i < 256; ++i) {
        const int d = kLargest ? 255 - i : i;
        if (static_cast<int64_t>(hist[d]) >= rest) {
          digit = d;
          break;
        }
        rest -= hist[d];
      }
      sel[0] = static_cast<unsigned long long>(prefix | (static_cast<U>(digit) << shift));
      sel[1] = static_cast<unsigned long long>(rest);
    }
    __syncthreads();
    prefix = static_cast<U>(sel[0]);
    k = static_cast<int64_t>(sel[1]);
    mask |= static_cast<U>(0xff) << shift;
    __syncthreads();  // everyone has read sel (and tid 0 the histogram) before the next digit
  }
  return prefix;
}

// More budget evictions than this in one step (chunks) use one radix select instead of rounds.
constexpr int64_t kEvictRounds = 2;

template <typename T, int D>
__device__ void commit(const DecodeParams& p, const Workspace& ws, int64_t b) {
  using A = acc_t<T>;
  using L = Tile<T, D>;
  constexpr int kWarps = kFinishThreads / 32;
  SELATTN_SHARED(sm_count, int64_t[kWarps]);
  SELATTN_SHARED(sm_victim, Victim[kWarps]);
  SELATTN_SHARED(sm_used, unsigned long long);
  const int tid = threadIdx.x;
  const int64_t S = p.slots, m = valid_new(p, b), first = p.seq_len[b];
  int64_t* pos = p.pos + b * S;
  A* f = static_cast<A*>(p.f) + b * S;
  const A* fnew = ws.run<A>(p.workspace, b, 0);  // written by the selection group's CTAs
  int64_t* new_slot = ws.get<int64_t>(p.workspace, ws.new_slot_at) + b * p.chunk;

  // Free slots, numbered in slot order: thread tid owns slots [lo, hi).
  const int64_t per = (S + kFinishThreads - 1) / kFinishThreads;
  const int64_t lo = tid * per < S ? tid * per : S, hi = lo + per < S ? lo + per : S;
  int64_t free_here = 0;
  for (int64_t j = lo; j < hi; ++j) free_here += pos[j] < 0;
  for (int64_t u = tid; u < m; u += kFinishThreads) new_slot[u] = -1;
  // Exclusive prefix of the free counts over the threads: a scan in each warp, then the warp
  // totals.
  int64_t incl = free_here;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t below = __shfl_up_sync(0xffffffffu, incl, o);
    if (tid % 32 >= o) incl += below;
  }
  if (tid % 32 == 31) sm_count[tid / 32] = incl;
  __syncthreads();
  int64_t rank = incl - free_here;
  for (int w = 0; w < tid / 32; ++w) rank += sm_count[w];
  for (int64_t j = lo; j < hi && rank < m; ++j)
    if (pos[j] < 0) new_slot[rank++] = j;
  // Step 3 for the tokens that were already cached (free slots keep their stale F). Without
  // new tokens (a ragged batch's idle sequence) nothing was accumulated and F stays.
  if (m > 0)
    for (int64_t j = tid; j < S; j += kFinishThreads)
      if (pos[j] >= 0) f[j] = fnew[j];
  __syncthreads();  // all reads of pos above happen before the insertion below

  // Step 1, committed: the new tokens take their slots (tokens without one are dropped, which
  // the budget + max_chunk slot count rules out).
  for (int64_t u = tid; u < m; u += kFinishThreads) {
    const int64_t s = new_slot[u];
    if (s < 0) continue;
    pos[s] = first + u;
    f[s] = fnew[S + u];
  }
  const int64_t copies = m * p.heads_kv * L::kVecs;
  for (int64_t i = tid; i < copies; i += kFinishThreads) {
    const int64_t vec = i % L::kVecs, h = (i / L::kVecs) % p.heads_kv, u = i / (L::kVecs * p.heads_kv);
    const int64_t s = new_slot[u];
    if (s < 0) continue;
    const uint4* ks = reinterpret_cast<const uint4*>(key_row<T>(p, b, h, S + u)) + vec;
    const uint4* vs = reinterpret_cast<const uint4*>(value_row<T>(p, b, h, S + u)) + vec;
    T* kd = static_cast<T*>(p.k_cache) + b * p.k_cache_batch_stride + h * p.k_cache_head_stride +
            s * p.k_cache_row_stride;
    T* vd = static_cast<T*>(p.v_cache) + b * p.v_cache_batch_stride + h * p.v_cache_head_stride +
            s * p.v_cache_row_stride;
    reinterpret_cast<uint4*>(kd)[vec] = *ks;
    reinterpret_cast<uint4*>(vd)[vec] = *vs;
  }
  if (tid == 0) sm_used = 0;
  __syncthreads();

  // Step 4: threshold, then the budget.
  unsigned long long used_here = 0;
  for (int64_t j = tid; j < S; j += kFinishThreads) {
    if (pos[j] < 0) continue;
    if (p.has_tau && pos[j] > 0 && static_cast<double>(f[j]) > p.tau) {
      pos[j] = -1;
      continue;
    }
    ++used_here;
  }
  atomicAdd(&sm_used, used_here);
  __syncthreads();
  int64_t used = static_cast<int64_t>(sm_used);
  if (used - p.budget > kEvictRounds) {
    // The excess in one pass: the excess-th largest F (radix select), then among the slots at
    // exactly that F the oldest ones (a second select on positions). BOS is never a candidate;
    // with budget >= 1 the excess never exceeds the candidates.
    using U = std::conditional_t<std::is_same_v<A, double>, uint64_t, uint32_t>;
    int64_t k = used - p.budget;
    const U fcut = radix_select<true, U>(
        S, k, [&](int64_t j) { return order_bits(f[j]); }, [&](int64_t j) { return pos[j] > 0; });
    const uint64_t pcut = radix_select<false, uint64_t>(
        S, k, [&](int64_t j) { return static_cast<uint64_t>(pos[j]); },
        [&](int64_t j) { return pos[j] > 0 && order_bits(f[j]) == fcut; });
    for (int64_t j = tid; j < S; j += kFinishThreads) {
      if (pos[j] <= 0) continue;
      const U x = order_bits(f[j]);
      if (x > fcut || (x == fcut && static_cast<uint64_t>(pos[j]) <= pcut)) pos[j] = -1;
    }
    used = p.budget;
  }
  while (used > p.budget) {
    Victim best{0.0, 0, -1};
    for (int64_t j = tid; j < S; j += kFinishThreads) {
      if (pos[j] <= 0) continue;
      // NaN (only from non-finite inputs) sorts as +inf, as on the CPU.
      const double fj = static_cast<double>(f[j]);
      const Victim c{fj != fj ? static_cast<double>(positive_inf<A>()) : fj, pos[j], j};
      if (evict_first(c, best)) best = c;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      Victim other{__shfl_xor_sync(0xffffffffu, best.f, o),
                   __shfl_xor_sync(0xffffffffu, best.pos, o),
                   __shfl_xor_sync(0xffffffffu, best.slot, o)};
      if (evict_first(other, best)) best = other;
    }
    if (tid % 32 == 0) sm_victim[tid / 32] = best;
    __syncthreads();
    if (tid == 0) {
      Victim v = sm_victim[0];
      for (int w = 1; w < kWarps; ++w)
        if (evict_first(sm_victim[w], v)) v = sm_victim[w];
      sm_victim[0] = v;
      if (v.slot >= 0) pos[v.slot] = -1;
    }
    __syncthreads();
    const bool none = sm_victim[0].slot < 0;  // only BOS left: unreachable with budget >= 1
    __syncthreads();  // everyone has read sm_victim[0] before the next round writes it
    if (none) break;
    --used;
  }
  if (tid == 0) p.seq_len[b] = first + m;
}

template <typename T, int D>
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const DecodeParams p, const Workspace ws) {
  const int64_t b = blockIdx.y;
  if (blockIdx.x == 0)
    commit<T, D>(p, ws, b);
  else
    combine_rows<T, D>(p, ws, b, blockIdx.x - 1);
}

}  // namespace selattn::cuda::decode
