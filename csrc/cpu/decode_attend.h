// Attention of one pruned-cache step on the CPU (DESIGN §3 step 2), given the F offsets.
//
// The rows of one kv group are its g query heads times the m chunk tokens: row r is head
// hk * g + r / m at chunk token r % m, so each K/V row is read once per group (GQA).
// offsets[t * S + j] is F_j plus the in-chunk exclusive sum of S for query t, or +inf where
// query t must not see slot j (free slot, or a later token of the chunk).
//
// Two paths:
//   tiled_rows  blocks of up to kBr rows against kBc-slot tiles: two GEMMs per tile with an
//               online softmax in between (the prefill forward's structure), for chunked
//               prefill and GQA decode;
//   rows        a few rows streamed over the slots with dot4 / axpy (plain decode, c = 1).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/decode_scratch.h"
#include "cpu/tile_math.h"
#include "decode_params.h"

namespace selattn::cpu::decode {

// Where one kv group's rows and cache live.
template <typename T>
struct GroupView {
  const DecodeParams* p;
  int64_t b, hk, g, m, S;
  const T* q_row(int64_t r) const {  // r < g * m
    const int64_t h = hk * g + r / m, t = r % m;
    return static_cast<const T*>(p->q) + b * p->q_batch_stride + h * p->q_head_stride +
           t * p->q_row_stride;
  }
  T* out_row(int64_t r) const {
    const int64_t h = hk * g + r / m, t = r % m;
    return static_cast<T*>(p->out) + b * p->out_batch_stride + h * p->out_head_stride +
           t * p->out_row_stride;
  }
  const T* k_row(int64_t j) const {
    return static_cast<const T*>(p->k_cache) + b * p->k_cache_batch_stride +
           hk * p->k_cache_head_stride + j * p->k_cache_row_stride;
  }
  const T* v_row(int64_t j) const {
    return static_cast<const T*>(p->v_cache) + b * p->v_cache_batch_stride +
           hk * p->v_cache_head_stride + j * p->v_cache_row_stride;
  }
};

template <typename A>
constexpr A kInf = std::numeric_limits<A>::infinity();

// Converts n elements of a row to the accumulation type; returns the row itself when no
// conversion is needed.
template <typename T, typename A>
const A* as_acc(const T* src, A* buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
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

// x[c] = s[c] - off[c] where off is finite, -inf where it is +inf (whatever s holds there: a
// free slot's stale key may give any logit). Returns the max.
template <typename A>
A subtract_offsets(A* s, const A* off, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  const Vec inf(kInf<A>), ninf(-kInf<A>);
  Vec vmax(-kInf<A>);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec o = Vec::loadu(off + c);
    const Vec x = Vec::blendv(Vec::loadu(s + c) - o, ninf, o == inf);
    x.store(s + c);
    vmax = at::vec::maximum(vmax, x);
  }
  A mx = at::vec::vec_reduce_all<A>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, vmax);
  for (; c < n; ++c) {
    s[c] = off[c] == kInf<A> ? -kInf<A> : s[c] - off[c];
    mx = std::max(mx, s[c]);
  }
  return mx;
}

// s[c] = exp(s[c] - mx) with exactly 0 where s[c] = -inf; returns the sum. mx is finite.
template <typename A>
A exp_masked_sum(A* s, A mx, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  const Vec vm(mx), ninf(-kInf<A>), zero(A(0));
  Vec vsum(A(0));
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec x = Vec::loadu(s + c);
    const Vec e = Vec::blendv(vexp(x - vm), zero, x == ninf);
    e.store(s + c);
    vsum = vsum + e;
  }
  A sum = at::vec::vec_reduce_all<A>([](Vec a, Vec b) { return a + b; }, vsum);
  for (; c < n; ++c) {
    s[c] = s[c] == -kInf<A> ? A(0) : std::exp(s[c] - mx);
    sum += s[c];
  }
  return sum;
}

// Rows [r0, r1) (r1 - r0 <= kBr) of a group, tiled. `ws` holds tiled_elems(D, S) elements.
template <typename T, typename A>
void tiled_rows(const GroupView<T>& gv, const A* offsets, A scale, int64_t r0, int64_t r1,
                A* ws) {
  const DecodeParams& p = *gv.p;
  const int64_t D = p.head_dim, S = gv.S, m = gv.m, R = r1 - r0, bc = attend_cols(S);
  A* q_buf = ws;
  A* s_buf = q_buf + kBr * D;
  A* o = s_buf + kBr * bc;
  A* mrow = o + kBr * D;
  A* lrow = mrow + kBr;
  A* k_buf = lrow + kBr;
  A* v_buf = k_buf + bc * D;

  for (int64_t r = 0; r < R; ++r) {
    const A* qr = as_acc(gv.q_row(r0 + r), q_buf + r * D, D);
    if (qr != q_buf + r * D) std::copy(qr, qr + D, q_buf + r * D);
  }
  std::fill(o, o + R * D, A(0));
  std::fill(mrow, mrow + R, -kInf<A>);
  std::fill(lrow, lrow + R, A(0));
  // The last chunk token sees every slot any row does: +inf there marks a free slot.
  const A* widest = offsets + (m - 1) * S;

  for (int64_t c0 = 0; c0 < S; c0 += bc) {
    const int64_t cols = std::min(bc, S - c0);
    int64_t ld_k, ld_v;
    const A* kt = load_rows<T, A>(gv.k_row(c0), p.k_cache_row_stride, cols, D, k_buf, &ld_k);
    gemm_rm<A>(false, true, R, cols, D, scale, q_buf, D, kt, ld_k, A(0), s_buf, bc);
    for (int64_t r = 0; r < R; ++r) {
      A* sr = s_buf + r * bc;
      const A* ot = offsets + ((r0 + r) % m) * S + c0;
      const A tile_max = subtract_offsets(sr, ot, cols);
      if (tile_max == -kInf<A>) {  // the row sees no slot of this tile
        std::fill(sr, sr + cols, A(0));
        continue;
      }
      const A m_new = std::max(mrow[r], tile_max);
      const A sum = exp_masked_sum(sr, m_new, cols);
      if (m_new != mrow[r]) {
        const A alpha = std::exp(mrow[r] - m_new);  // 0 on the row's first visible tile
        A* orow = o + r * D;
        for (int64_t d = 0; d < D; ++d) orow[d] *= alpha;
        lrow[r] = lrow[r] * alpha + sum;
        mrow[r] = m_new;
      } else {
        lrow[r] += sum;
      }
    }
    // Probabilities of free slots are 0, but 0 * (stale non-finite value) is not: their V rows
    // enter the GEMM as zeros. Slots in use hold finite values the caller wrote.
    bool has_free = false;
    for (int64_t j = 0; j < cols && !has_free; ++j) has_free = widest[c0 + j] == kInf<A>;
    const A* vt;
    if (has_free) {
      for (int64_t j = 0; j < cols; ++j) {
        A* dst = v_buf + j * D;
        if (widest[c0 + j] == kInf<A>) {
          std::fill(dst, dst + D, A(0));
        } else {
          const A* src = as_acc(gv.v_row(c0 + j), dst, D);
          if (src != dst) std::copy(src, src + D, dst);
        }
      }
      vt = v_buf, ld_v = D;
    } else {
      vt = load_rows<T, A>(gv.v_row(c0), p.v_cache_row_stride, cols, D, v_buf, &ld_v);
    }
    gemm_rm<A>(false, false, R, D, cols, A(1), s_buf, bc, vt, ld_v, A(1), o, D);
  }

  for (int64_t r = 0; r < R; ++r) {
    // Every row sees at least its own token with a finite logit: lrow >= 1.
    const A inv = A(1) / lrow[r];
    A* orow = o + r * D;
    for (int64_t d = 0; d < D; ++d) orow[d] *= inv;
    T* out = gv.out_row(r0 + r);
    if constexpr (std::is_same_v<T, A>) {
      std::copy(orow, orow + D, out);
    } else {
      at::vec::convert(orow, out, D);
    }
  }
}

// Rows [r0, r1) (fewer than kMinTiledRows) of a group, streamed slot by slot. Masked slots get
// probability exactly 0 and their k/v are never accumulated, so stale data in free slots cannot
// leak in. `ws` holds row_elems(D, S) elements.
template <typename T, typename A>
void stream_rows(const GroupView<T>& gv, const A* offsets, A scale, int64_t r0, int64_t r1,
                 A* ws) {
  using Vec = at::vec::Vectorized<A>;
  const DecodeParams& p = *gv.p;
  const int64_t D = p.head_dim, S = gv.S, m = gv.m, R = r1 - r0;
  constexpr int64_t Rmax = kMinTiledRows - 1;
  A* qbuf = ws;
  A* logits = qbuf + Rmax * D;
  A* acc = logits + Rmax * S;
  A* kbuf = acc + Rmax * D;
  A* vbuf = kbuf + 4 * D;
  A* denom = vbuf + D;
  for (int64_t r = 0; r < R; ++r) {
    const A* qr = as_acc(gv.q_row(r0 + r), qbuf + r * D, D);
    if (qr != qbuf + r * D) std::copy(qr, qr + D, qbuf + r * D);
  }
  std::fill(acc, acc + R * D, A(0));
  int64_t j = 0;
  for (; j + 4 <= S; j += 4) {
    const A* rows[4];
    for (int k = 0; k < 4; ++k) rows[k] = as_acc(gv.k_row(j + k), kbuf + k * D, D);
    for (int64_t r = 0; r < R; ++r) dot4(qbuf + r * D, rows, D, logits + r * S + j);
  }
  for (; j < S; ++j) {
    const A* kr = as_acc(gv.k_row(j), kbuf, D);
    for (int64_t r = 0; r < R; ++r) {
      const A* qr = qbuf + r * D;
      A s = 0;
      for (int64_t d = 0; d < D; ++d) s += qr[d] * kr[d];
      logits[r * S + j] = s;
    }
  }
  const Vec vscale(scale);
  for (int64_t r = 0; r < R; ++r) {
    A* lg = logits + r * S;
    for (j = 0; j + Vec::size() <= S; j += Vec::size())
      (Vec::loadu(lg + j) * vscale).store(lg + j);
    for (; j < S; ++j) lg[j] *= scale;
    // The query's own token is always visible with a finite logit: the max is finite.
    const A mx = subtract_offsets(lg, offsets + ((r0 + r) % m) * S, S);
    denom[r] = exp_masked_sum(lg, mx, S);
  }
  // The last token of the chunk sees every slot any earlier one does.
  const A* widest = offsets + (m - 1) * S;
  for (j = 0; j < S; ++j) {
    if (widest[j] == kInf<A>) continue;
    const A* vr = as_acc(gv.v_row(j), vbuf, D);
    for (int64_t r = 0; r < R; ++r) {
      if (offsets[((r0 + r) % m) * S + j] == kInf<A>) continue;
      axpy(logits[r * S + j], vr, acc + r * D, D);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    T* o = gv.out_row(r0 + r);
    const A inv = A(1) / denom[r];
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[r * D + d] * inv);
  }
}

}  // namespace selattn::cpu::decode
