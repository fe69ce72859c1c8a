// CUDA kernels of one pruned-KV-cache step (DESIGN §3; semantics in decode_params.h).
// Torch-free: included by csrc/cuda/instantiations/decode_<dtype>.cu, one set per element type.
//
// Three launches per step, flash-decoding style. The new tokens are read from k_new/v_new as
// extra "virtual" key columns slots .. slots+c-1, so nothing is written to the cache until the
// last kernel, and no kernel races another on the cache:
//   1. select: grid (column blocks, B). For every key column j (cached slot or new token) and
//      every new query t: off[t][j] = F_j + sum_{t'<t} S[t',j] if pos(j) <= pos(t) else +inf,
//      and fnew[j] = F_j + sum_t S[t,j]. S uses the selection head only: once per sequence.
//   2. attend: grid (splits x query rows, B). Each CTA runs an online softmax over its share of
//      the columns for one query row (head h, token t) with logits s q.k - off, and writes a
//      partial state (max, sum, unnormalised output) to the workspace.
//   3. finish: grid (1 + row blocks, B). Blocks >= 1 merge the partial states into `out`;
//      block 0 commits the step for its sequence: F update, insertion of the new tokens into
//      free slots, eviction (tau, then budget argmax with ties to the oldest, never BOS) and
//      seq_len. Block 0 writes only cache state, which blocks >= 1 never read.
// Loads are 16 bytes wide: a row of D elements is NV = D * sizeof(T) / 16 vectors, read by a
// group of LPK lanes (a power of two dividing NV), VPL = NV / LPK vectors per lane.
#pragma once

#include "cuda/arch.cuh"

#include <cstdint>
#include <type_traits>

#include "decode_params.h"

namespace selattn::cuda::decode {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kSelectThreads = 128;
constexpr int kAttendThreads = 128;
constexpr int kFinishThreads = 256;
constexpr int kFinishRowsPerBlock = kFinishThreads / 32;  // one warp per query row

__host__ __device__ constexpr int largest_pow2_divisor(int n, int cap) {
  int p = 1;
  while (p * 2 <= cap && n % (p * 2) == 0) p *= 2;
  return p;
}

template <typename T, int D>
struct Layout {
  static constexpr int kElemsPerVec = 16 / static_cast<int>(sizeof(T));
  static_assert(D % kElemsPerVec == 0, "head_dim must fill whole 16-byte vectors");
  static constexpr int kVecs = D / kElemsPerVec;                  // NV
  static constexpr int kLanes = largest_pow2_divisor(kVecs, 32);  // LPK
  static constexpr int kVecsPerLane = kVecs / kLanes;             // VPL
  static constexpr int kRegs = kVecsPerLane * kElemsPerVec;       // elements held per lane
};

// Workspace carve-up, shared by the host (sizes) and the kernels (pointers).
struct Workspace {
  int64_t ncols;  // slots + chunk
  int64_t rows;   // heads_q * chunk
  int64_t splits;
  size_t off_at, fnew_at, part_m_at, part_l_at, part_acc_at, new_slot_at, bytes;

  __host__ __device__ static size_t round_up(size_t x) { return (x + 255) / 256 * 256; }

  __host__ __device__ Workspace(const DecodeParams& p, int64_t num_splits, size_t acc_size) {
    ncols = p.slots + p.chunk;
    rows = p.heads_q * p.chunk;
    splits = num_splits;
    size_t at = 0;
    off_at = at, at = round_up(at + acc_size * p.batch * p.chunk * ncols);
    fnew_at = at, at = round_up(at + acc_size * p.batch * ncols);
    part_m_at = at, at = round_up(at + acc_size * p.batch * rows * splits);
    part_l_at = at, at = round_up(at + acc_size * p.batch * rows * splits);
    part_acc_at = at, at = round_up(at + acc_size * p.batch * rows * splits * p.head_dim);
    new_slot_at = at, at = round_up(at + sizeof(int64_t) * p.batch * p.chunk);
    bytes = at;
  }
  template <typename U>
  __host__ __device__ U* get(void* base, size_t at) const {
    return reinterpret_cast<U*>(static_cast<char*>(base) + at);
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

// Loads this lane's slice of a row (vectors lane, lane + LPK, ...) as accumulation type.
template <typename T, int D>
__device__ __forceinline__ void load_slice(const T* row, int lane, acc_t<T>* dst) {
  using L = Layout<T, D>;
  const uint4* v = reinterpret_cast<const uint4*>(row);
#pragma unroll
  for (int i = 0; i < L::kVecsPerLane; ++i)
    unpack<T>(__ldg(v + lane + i * L::kLanes), dst + i * L::kElemsPerVec);
}

// Sum over the LPK lanes of a group (aligned groups inside one warp). Every lane of the warp
// must call it.
template <int Lanes, typename A>
__device__ __forceinline__ A group_sum(A x) {
#pragma unroll
  for (int o = Lanes / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
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

// ---- 1. selection scores -> per-query F offsets and the updated F ------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kSelectThreads)
    select_kernel(const DecodeParams p, const Workspace ws) {
  using A = acc_t<T>;
  using L = Layout<T, D>;
  constexpr int kGroups = kSelectThreads / L::kLanes;
  const int64_t b = blockIdx.y;
  const int lane = threadIdx.x % L::kLanes;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / L::kLanes;
  const int64_t m = valid_new(p, b);
  const int64_t first = p.seq_len[b];
  const int64_t sel_kv = p.sel_head / (p.heads_q / p.heads_kv);
  A* off = ws.get<A>(p.workspace, ws.off_at) + b * p.chunk * ws.ncols;
  A* fnew = ws.get<A>(p.workspace, ws.fnew_at) + b * ws.ncols;

  int64_t pj = -1;
  A run = A(0);
  if (j < p.slots) {
    pj = p.pos[b * p.slots + j];
    if (pj >= 0) run = static_cast<const A*>(p.f)[b * p.slots + j];
  } else if (j < ws.ncols && j - p.slots < m) {
    pj = first + (j - p.slots);
  }
  A kreg[L::kRegs];
  if (pj >= 0) {
    load_slice<T, D>(key_row<T>(p, b, sel_kv, j), lane, kreg);
  } else {
#pragma unroll
    for (int e = 0; e < L::kRegs; ++e) kreg[e] = A(0);
  }
  const T* q_sel = static_cast<const T*>(p.q) + b * p.q_batch_stride + p.sel_head * p.q_head_stride;
  // Uniform trip count over the block: every lane takes part in every group_sum.
  for (int64_t t = 0; t < m; ++t) {
    A qreg[L::kRegs];
    load_slice<T, D>(q_sel + t * p.q_row_stride, lane, qreg);
    A part = A(0);
#pragma unroll
    for (int e = 0; e < L::kRegs; ++e) part += qreg[e] * kreg[e];
    const A a = static_cast<A>(p.scale) * group_sum<L::kLanes>(part);
    if (lane == 0 && j < ws.ncols)
      off[t * ws.ncols + j] = (pj >= 0 && pj <= first + t) ? run : positive_inf<A>();
    if (pj > 0 && pj < first + t && a > A(0)) run += a;
  }
  if (lane == 0 && j < ws.ncols) fnew[j] = run;
}

// ---- 2. split-slot attention: partial softmax states --------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kAttendThreads)
    attend_kernel(const DecodeParams p, const Workspace ws, int64_t cols_per_split) {
  using A = acc_t<T>;
  using L = Layout<T, D>;
  constexpr int kGroups = kAttendThreads / L::kLanes;
  const int64_t b = blockIdx.y;
  const int64_t split = blockIdx.x % ws.splits;
  const int64_t row = blockIdx.x / ws.splits;  // h * chunk + t
  const int64_t h = row / p.chunk, t = row % p.chunk;
  if (t >= valid_new(p, b)) return;  // finish writes zeros for this row
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const int lane = threadIdx.x % L::kLanes;
  const int group = threadIdx.x / L::kLanes;
  const A* off = ws.get<A>(p.workspace, ws.off_at) + (b * p.chunk + t) * ws.ncols;
  const int64_t begin = split * cols_per_split;
  const int64_t end = begin + cols_per_split < ws.ncols ? begin + cols_per_split : ws.ncols;

  A qreg[L::kRegs], acc[L::kRegs];
  load_slice<T, D>(static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                       t * p.q_row_stride,
                   lane, qreg);
#pragma unroll
  for (int e = 0; e < L::kRegs; ++e) acc[e] = A(0);
  A run_max = -positive_inf<A>(), run_sum = A(0);
  const A scale = static_cast<A>(p.scale);

  for (int64_t base = begin; base < end; base += kGroups) {
    const int64_t j = base + group;
    const bool visible = j < end && off[j] != positive_inf<A>();
    A kreg[L::kRegs];
    if (visible) {
      load_slice<T, D>(key_row<T>(p, b, hk, j), lane, kreg);
    } else {
#pragma unroll
      for (int e = 0; e < L::kRegs; ++e) kreg[e] = A(0);
    }
    A part = A(0);
#pragma unroll
    for (int e = 0; e < L::kRegs; ++e) part += qreg[e] * kreg[e];
    const A dot = group_sum<L::kLanes>(part);
    if (visible) {
      const A logit = scale * dot - off[j];
      const A new_max = logit > run_max ? logit : run_max;
      const A correction = exp_acc(run_max - new_max);  // 0 on the first visible key
      const A prob = exp_acc(logit - new_max);
      A vreg[L::kRegs];
      load_slice<T, D>(value_row<T>(p, b, hk, j), lane, vreg);
#pragma unroll
      for (int e = 0; e < L::kRegs; ++e) acc[e] = acc[e] * correction + prob * vreg[e];
      run_sum = run_sum * correction + prob;
      run_max = new_max;
    }
  }

  // Merge the groups of the block.
  SELATTN_SHARED(sm_max, A[kGroups]);
  SELATTN_SHARED(sm_sum, A[kGroups]);
  SELATTN_SHARED(sm_acc, A[kGroups][D]);
  if (lane == 0) sm_max[group] = run_max, sm_sum[group] = run_sum;
#pragma unroll
  for (int i = 0; i < L::kVecsPerLane; ++i)
#pragma unroll
    for (int e = 0; e < L::kElemsPerVec; ++e)
      sm_acc[group][(lane + i * L::kLanes) * L::kElemsPerVec + e] = acc[i * L::kElemsPerVec + e];
  __syncthreads();
  A block_max = -positive_inf<A>();
  for (int g = 0; g < kGroups; ++g) block_max = sm_max[g] > block_max ? sm_max[g] : block_max;
  const bool empty = block_max == -positive_inf<A>();  // no visible key in this split
  const int64_t state = (b * ws.rows + row) * ws.splits + split;
  A* part_acc = ws.get<A>(p.workspace, ws.part_acc_at) + state * D;
  for (int d = threadIdx.x; d < D; d += kAttendThreads) {
    A sum = A(0);
    if (!empty)
      for (int g = 0; g < kGroups; ++g)
        if (sm_sum[g] > A(0)) sum += sm_acc[g][d] * exp_acc(sm_max[g] - block_max);
    part_acc[d] = sum;
  }
  if (threadIdx.x == 0) {
    A total = A(0);
    if (!empty)
      for (int g = 0; g < kGroups; ++g)
        if (sm_sum[g] > A(0)) total += sm_sum[g] * exp_acc(sm_max[g] - block_max);
    ws.get<A>(p.workspace, ws.part_m_at)[state] = block_max;
    ws.get<A>(p.workspace, ws.part_l_at)[state] = total;
  }
}

// ---- 3a. merge the split states into out ---------------------------------------------------

template <typename T, int D>
__device__ void combine_rows(const DecodeParams& p, const Workspace& ws, int64_t b,
                             int64_t row_block) {
  using A = acc_t<T>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = row_block * kFinishRowsPerBlock + warp;
  if (row >= ws.rows) return;
  const int64_t h = row / p.chunk, t = row % p.chunk;
  T* o = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
         t * p.out_row_stride;
  if (t >= valid_new(p, b)) {
    for (int d = lane; d < D; d += 32) o[d] = from_acc<T>(A(0));
    return;
  }
  const int64_t first_state = (b * ws.rows + row) * ws.splits;
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

// ---- 3b. commit: F update, insertion, eviction ---------------------------------------------

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

template <typename T, int D>
__device__ void commit(const DecodeParams& p, const Workspace& ws, int64_t b) {
  using A = acc_t<T>;
  using L = Layout<T, D>;
  constexpr int kWarps = kFinishThreads / 32;
  SELATTN_SHARED(sm_count, int64_t[kFinishThreads]);
  SELATTN_SHARED(sm_victim, Victim[kWarps]);
  SELATTN_SHARED(sm_used, unsigned long long);
  const int tid = threadIdx.x;
  const int64_t S = p.slots, m = valid_new(p, b), first = p.seq_len[b];
  int64_t* pos = p.pos + b * S;
  A* f = static_cast<A*>(p.f) + b * S;
  const A* fnew = ws.get<A>(p.workspace, ws.fnew_at) + b * ws.ncols;
  int64_t* new_slot = ws.get<int64_t>(p.workspace, ws.new_slot_at) + b * p.chunk;

  // Free slots, numbered in slot order: thread tid owns slots [lo, hi).
  const int64_t per = (S + kFinishThreads - 1) / kFinishThreads;
  const int64_t lo = tid * per < S ? tid * per : S, hi = lo + per < S ? lo + per : S;
  int64_t free_here = 0;
  for (int64_t j = lo; j < hi; ++j) free_here += pos[j] < 0;
  sm_count[tid] = free_here;
  for (int64_t u = tid; u < m; u += kFinishThreads) new_slot[u] = -1;
  __syncthreads();
  if (tid == 0)
    for (int i = 1; i < kFinishThreads; ++i) sm_count[i] += sm_count[i - 1];
  __syncthreads();
  int64_t rank = tid == 0 ? 0 : sm_count[tid - 1];
  for (int64_t j = lo; j < hi && rank < m; ++j)
    if (pos[j] < 0) new_slot[rank++] = j;
  // Step 3 for the tokens that were already cached (free slots keep their stale F).
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
  while (used > p.budget) {
    Victim best{0.0, 0, -1};
    for (int64_t j = tid; j < S; j += kFinishThreads) {
      if (pos[j] <= 0) continue;
      const Victim c{static_cast<double>(f[j]), pos[j], j};
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

// ---- launch ---------------------------------------------------------------------------------

template <typename T, int D>
cudaError_t launch(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  using L = Layout<T, D>;
  constexpr int kSelectCols = kSelectThreads / L::kLanes;
  const dim3 select_grid(static_cast<unsigned>((ws.ncols + kSelectCols - 1) / kSelectCols),
                         static_cast<unsigned>(p.batch));
  cudaError_t err =
      launch_kernel(select_kernel<T, D>, select_grid, dim3(kSelectThreads), 0, stream, p, ws);
  if (err != cudaSuccess) return err;
  const int64_t cols_per_split = (ws.ncols + ws.splits - 1) / ws.splits;
  const dim3 attend_grid(static_cast<unsigned>(ws.splits * ws.rows),
                         static_cast<unsigned>(p.batch));
  err = launch_kernel(attend_kernel<T, D>, attend_grid, dim3(kAttendThreads), 0, stream, p, ws,
                      cols_per_split);
  if (err != cudaSuccess) return err;
  const dim3 finish_grid(
      static_cast<unsigned>(1 + (ws.rows + kFinishRowsPerBlock - 1) / kFinishRowsPerBlock),
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
