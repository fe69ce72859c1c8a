// CPU kernel of one pruned-KV-cache step (DESIGN §3; semantics in decode_params.h).
//
// Two parallel regions:
//   1. per sequence: insert the new tokens into free slots, compute the selection scores of the
//      chunk queries against every used slot once (not per head), turn them into the per-query
//      F offsets (with +inf for keys a query must not see), update F and evict. Eviction only
//      frees slots (pos = -1) and never overwrites k/v, so the attention below still reads the
//      keys that were in C during this step.
//   2. per (sequence, kv head): softmax attention of the chunk queries of the kv head's g query
//      heads with those offsets (split further only when there are fewer groups than threads).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/decode_cpu.h"

namespace selattn::cpu {
namespace {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Converts n elements of a row to the accumulation type; returns the row itself when no
// conversion is needed.
template <typename T, typename A>
const A* as_acc(const T* src, A* buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    using VecT = at::vec::Vectorized<T>;
    using VecF = at::vec::Vectorized<float>;
    int64_t i = 0;
    for (; i + VecT::size() <= n; i += VecT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(src + i));
      lo.store(buf + i);
      hi.store(buf + i + VecF::size());
    }
    for (; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

template <typename A>
A dot(const A* a, const A* b, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  Vec sum(A(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    sum = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), sum);
  A r = at::vec::vec_reduce_all<A>([](Vec x, Vec y) { return x + y; }, sum);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// out[r] = a . b[r] for four rows at once: independent accumulators hide the FMA latency.
template <typename A>
void dot4(const A* a, const A* const* b, int64_t n, A* out) {
  using Vec = at::vec::Vectorized<A>;
  Vec s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec va = Vec::loadu(a + i);
    s0 = at::vec::fmadd(va, Vec::loadu(b[0] + i), s0);
    s1 = at::vec::fmadd(va, Vec::loadu(b[1] + i), s1);
    s2 = at::vec::fmadd(va, Vec::loadu(b[2] + i), s2);
    s3 = at::vec::fmadd(va, Vec::loadu(b[3] + i), s3);
  }
  const auto add = [](Vec x, Vec y) { return x + y; };
  out[0] = at::vec::vec_reduce_all<A>(add, s0);
  out[1] = at::vec::vec_reduce_all<A>(add, s1);
  out[2] = at::vec::vec_reduce_all<A>(add, s2);
  out[3] = at::vec::vec_reduce_all<A>(add, s3);
  for (; i < n; ++i)
    for (int r = 0; r < 4; ++r) out[r] += a[i] * b[r][i];
}

// y += alpha * x
template <typename A>
void axpy(A alpha, const A* x, A* y, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  const Vec va(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T>
void copy_row(const T* src, T* dst, int64_t n) {
  std::copy(src, src + n, dst);
}

template <typename T>
struct Step {
  using A = acc_type<T>;
  const DecodeParams& p;
  const int64_t B, Hq, Hkv, c, D, S, g;
  // offsets[(b * c + t) * S + j]: F_j + sum_{t' < t} S[t', j] for keys query t sees, else +inf.
  std::vector<A> offsets;
  std::vector<int64_t> first_pos;  // L per sequence (before the step)
  std::vector<int64_t> n_new;      // m per sequence

  explicit Step(const DecodeParams& params)
      : p(params), B(p.batch), Hq(p.heads_q), Hkv(p.heads_kv), c(p.chunk), D(p.head_dim),
        S(p.slots), g(p.heads_q / p.heads_kv),
        offsets(static_cast<size_t>(B * c * S)), first_pos(B), n_new(B) {}

  const T* q_row(int64_t b, int64_t h, int64_t t) const {
    return static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
           t * p.q_row_stride;
  }
  T* k_cache_row(int64_t b, int64_t h, int64_t j) const {
    return static_cast<T*>(p.k_cache) + b * p.k_cache_batch_stride + h * p.k_cache_head_stride +
           j * p.k_cache_row_stride;
  }
  T* v_cache_row(int64_t b, int64_t h, int64_t j) const {
    return static_cast<T*>(p.v_cache) + b * p.v_cache_batch_stride + h * p.v_cache_head_stride +
           j * p.v_cache_row_stride;
  }

  void insert(int64_t b, int64_t* pos, A* f) {
    const int64_t L = first_pos[b], m = n_new[b];
    int64_t u = 0;
    for (int64_t j = 0; j < S && u < m; ++j) {
      if (pos[j] != -1) continue;
      pos[j] = L + u;
      f[j] = A(0);
      for (int64_t h = 0; h < Hkv; ++h) {
        const T* kn = static_cast<const T*>(p.k_new) + b * p.k_new_batch_stride +
                      h * p.k_new_head_stride + u * p.k_new_row_stride;
        const T* vn = static_cast<const T*>(p.v_new) + b * p.v_new_batch_stride +
                      h * p.v_new_head_stride + u * p.v_new_row_stride;
        copy_row(kn, k_cache_row(b, h, j), D);
        copy_row(vn, v_cache_row(b, h, j), D);
      }
      ++u;
    }
    TORCH_CHECK(u == m, "selattn: decode_step: sequence ", b, " has ", u,
                " free cache slots for ", m, " new tokens (cache state was modified by hand?)");
  }

  // Offsets for every query of the chunk and the F update (steps 2 and 3 of §3).
  void select(int64_t b, const int64_t* pos, A* f, std::vector<A>& q_sel, std::vector<A>& kbuf) {
    const int64_t L = first_pos[b], m = n_new[b];
    const int64_t sel_kv = p.sel_head / g;
    for (int64_t t = 0; t < m; ++t) {
      const A* qs = as_acc(q_row(b, p.sel_head, t), q_sel.data() + t * D, D);
      if (qs != q_sel.data() + t * D) std::copy(qs, qs + D, q_sel.data() + t * D);
    }
    A* off = offsets.data() + b * c * S;
    constexpr A kInf = std::numeric_limits<A>::infinity();
    for (int64_t j = 0; j < S; ++j) {
      const int64_t pj = pos[j];
      if (pj < 0) {
        for (int64_t t = 0; t < m; ++t) off[t * S + j] = kInf;
        continue;
      }
      const A* ks = as_acc(k_cache_row(b, sel_kv, j), kbuf.data(), D);
      A run = f[j];
      for (int64_t t = 0; t < m; ++t) {
        off[t * S + j] = pj <= L + t ? run : kInf;
        if (pj > 0 && pj < L + t) {
          const A a = static_cast<A>(p.scale) * dot(q_sel.data() + t * D, ks, D);
          if (a > A(0)) run += a;
        }
      }
      f[j] = run;
    }
  }

  // Step 4 of §3. BOS (position 0) is never a candidate.
  void evict(int64_t* pos, const A* f) const {
    int64_t used = 0;
    for (int64_t j = 0; j < S; ++j) {
      if (pos[j] < 0) continue;
      if (p.has_tau && pos[j] > 0 && static_cast<double>(f[j]) > p.tau) {
        pos[j] = -1;
        continue;
      }
      ++used;
    }
    while (used > p.budget) {
      int64_t victim = -1;
      for (int64_t j = 0; j < S; ++j) {
        if (pos[j] <= 0) continue;
        if (victim < 0 || f[j] > f[victim] || (f[j] == f[victim] && pos[j] < pos[victim]))
          victim = j;
      }
      if (victim < 0) break;  // only BOS left; budget >= 1 makes this unreachable
      pos[victim] = -1;
      --used;
    }
  }

  void update_cache() {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<A> q_sel(static_cast<size_t>(c * D)), kbuf(static_cast<size_t>(D));
      for (int64_t b = b0; b < b1; ++b) {
        int64_t* pos = p.pos + b * S;
        A* f = static_cast<A*>(p.f) + b * S;
        insert(b, pos, f);
        select(b, pos, f, q_sel, kbuf);
        evict(pos, f);
        p.seq_len[b] = first_pos[b] + n_new[b];
      }
    });
  }

  // Softmax attention of rows [r0, r1) of one kv group over the slots. Row r is query head
  // hk * g + r / m at chunk token r % m, so the g heads that share a kv head (GQA) read each
  // key and value row once per task instead of once per head. Masked slots (offset +inf) get
  // probability exactly 0 and their k/v are never accumulated, so stale data in free slots
  // cannot leak in.
  void attend_rows(int64_t b, int64_t hk, int64_t r0, int64_t r1, std::vector<A>& qbuf,
                   std::vector<A>& logits, std::vector<A>& acc, std::vector<A>& kbuf,
                   std::vector<A>& vbuf) const {
    using Vec = at::vec::Vectorized<A>;
    constexpr A kInf = std::numeric_limits<A>::infinity();
    const int64_t m = n_new[b], R = r1 - r0;
    const A scale = static_cast<A>(p.scale);
    const A* off = offsets.data() + b * c * S;
    qbuf.resize(R * D), logits.resize(R * S), acc.assign(R * D, A(0));
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = hk * g + (r0 + r) / m, t = (r0 + r) % m;
      const A* qr = as_acc(q_row(b, h, t), qbuf.data() + r * D, D);
      if (qr != qbuf.data() + r * D) std::copy(qr, qr + D, qbuf.data() + r * D);
    }
    int64_t j = 0;
    for (; j + 4 <= S; j += 4) {
      const A* rows[4];
      for (int k = 0; k < 4; ++k) rows[k] = as_acc(k_cache_row(b, hk, j + k), kbuf.data() + k * D, D);
      for (int64_t r = 0; r < R; ++r) dot4(qbuf.data() + r * D, rows, D, logits.data() + r * S + j);
    }
    for (; j < S; ++j) {
      const A* kr = as_acc(k_cache_row(b, hk, j), kbuf.data(), D);
      for (int64_t r = 0; r < R; ++r) logits[r * S + j] = dot(qbuf.data() + r * D, kr, D);
    }
    std::vector<A> denom(R);
    for (int64_t r = 0; r < R; ++r) {
      A* lg = logits.data() + r * S;
      const A* ot = off + ((r0 + r) % m) * S;
      A mx = -kInf;
      for (j = 0; j < S; ++j) {
        lg[j] = ot[j] == kInf ? -kInf : scale * lg[j] - ot[j];
        mx = std::max(mx, lg[j]);
      }
      // The query's own token is always visible with a finite logit: mx is finite.
      const Vec vmx(mx);
      for (j = 0; j + Vec::size() <= S; j += Vec::size())
        (Vec::loadu(lg + j) - vmx).exp().store(lg + j);
      for (; j < S; ++j) lg[j] = std::exp(lg[j] - mx);
      A sum = 0;
      for (j = 0; j < S; ++j) sum += ot[j] == kInf ? A(0) : lg[j];
      denom[r] = sum;  // >= 1: the maximum contributes exp(0)
    }
    // The last token of the chunk sees every key any earlier one does.
    const A* widest = off + (m - 1) * S;
    for (j = 0; j < S; ++j) {
      if (widest[j] == kInf) continue;
      const A* vr = as_acc(v_cache_row(b, hk, j), vbuf.data(), D);
      for (int64_t r = 0; r < R; ++r) {
        if (off[((r0 + r) % m) * S + j] == kInf) continue;
        axpy(logits[r * S + j], vr, acc.data() + r * D, D);
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = hk * g + (r0 + r) / m, t = (r0 + r) % m;
      T* o = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
             t * p.out_row_stride;
      const A inv = A(1) / denom[r];
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[r * D + d] * inv);
    }
  }

  void attend() {
    // Zero the rows of tokens beyond a sequence's length (ragged batches).
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t t = n_new[b]; t < c; ++t) {
          T* o = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
                 t * p.out_row_stride;
          std::fill(o, o + D, T(0));
        }
    // Tasks: (sequence, kv head, slice of its g * m rows). Slices only when there are fewer
    // kv groups than threads (e.g. MQA), since each slice re-reads the group's keys.
    const int64_t groups = B * Hkv;
    const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(
        g * c, (at::get_num_threads() + groups - 1) / groups));
    at::parallel_for(0, groups * slices, 1, [&](int64_t w0, int64_t w1) {
      std::vector<A> qbuf, logits, acc, kbuf(4 * D), vbuf(D);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t b = w / (Hkv * slices), hk = (w / slices) % Hkv, slice = w % slices;
        const int64_t R = g * n_new[b];
        const int64_t r0 = R * slice / slices, r1 = R * (slice + 1) / slices;
        if (r1 > r0) attend_rows(b, hk, r0, r1, qbuf, logits, acc, kbuf, vbuf);
      }
    });
  }

  void run() {
    for (int64_t b = 0; b < B; ++b) {
      first_pos[b] = p.seq_len[b];
      n_new[b] = p.lengths ? p.lengths[b] : c;
    }
    update_cache();
    attend();
  }
};

}  // namespace

void decode_step(const DecodeParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: Step<float>(p).run(); break;
    case DType::kFloat64: Step<double>(p).run(); break;
    case DType::kBFloat16: Step<c10::BFloat16>(p).run(); break;
    case DType::kFloat16: Step<c10::Half>(p).run(); break;
  }
}

}  // namespace selattn::cpu
