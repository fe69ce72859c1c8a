// CPU kernel of one pruned-KV-cache step (DESIGN §3; semantics in decode_params.h).
//
// Four phases, each one parallel region:
//   1. insert   per sequence: the new tokens go into free slots with F = 0.
//   2. select   per (sequence, tile of kSc slots): one GEMM of the chunk's selection queries
//               against the tile's selection keys (computed once, not per head), then a pass
//               down the chunk that writes each query's F offsets (cached F plus the in-chunk
//               exclusive sum of S, +inf where the query must not look) and leaves the new F.
//   3. attend   per (sequence, kv group, block of rows): softmax attention with those offsets
//               (decode_attend.h), tiled GEMMs for chunks, a streaming path for plain decode.
//   4. evict    per sequence, one pass: tau first, then the excess over the budget chosen at
//               once with nth_element (largest F first, ties to the oldest, never BOS).
// Eviction only marks slots free (pos = -1); it runs after the attention, which therefore sees
// every token that was in C during the step, as §3 orders it.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/decode_attend.h"
#include "cpu/decode_cpu.h"
#include "cpu/decode_scratch.h"
#include "cpu/tile_math.h"

namespace selattn::cpu {
namespace {

using namespace decode;

template <typename T, typename A>
struct Step {
  const DecodeParams& p;
  const int64_t B, Hq, Hkv, c, D, S, g;
  const A scale;
  std::unique_ptr<A[]> offsets;  // offsets[(b * c + t) * S + j], see decode_attend.h
  std::vector<int64_t> first_pos;  // L per sequence (before the step)
  std::vector<int64_t> n_new;      // m per sequence

  explicit Step(const DecodeParams& params)
      : p(params), B(p.batch), Hq(p.heads_q), Hkv(p.heads_kv), c(p.chunk), D(p.head_dim),
        S(p.slots), g(p.heads_q / p.heads_kv), scale(static_cast<A>(p.scale)),
        offsets(uninit<A>(offsets_elems(B, c, S))), first_pos(B), n_new(B) {}

  T* k_cache_row(int64_t b, int64_t h, int64_t j) const {
    return static_cast<T*>(p.k_cache) + b * p.k_cache_batch_stride + h * p.k_cache_head_stride +
           j * p.k_cache_row_stride;
  }
  T* v_cache_row(int64_t b, int64_t h, int64_t j) const {
    return static_cast<T*>(p.v_cache) + b * p.v_cache_batch_stride + h * p.v_cache_head_stride +
           j * p.v_cache_row_stride;
  }
  int64_t* pos_of(int64_t b) const { return p.pos + b * S; }
  A* f_of(int64_t b) const { return static_cast<A*>(p.f) + b * S; }

  void insert(int64_t b) {
    const int64_t L = first_pos[b], m = n_new[b];
    int64_t* pos = pos_of(b);
    A* f = f_of(b);
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
        std::copy(kn, kn + D, k_cache_row(b, h, j));
        std::copy(vn, vn + D, v_cache_row(b, h, j));
      }
      ++u;
    }
    TORCH_CHECK(u == m, "selattn: decode_step: sequence ", b, " has ", u,
                " free cache slots for ", m, " new tokens (cache state was modified by hand?)");
  }

  // Steps 2 (the offsets) and 3 (the F update) of §3 for slots [j0, j0 + cols) of sequence b.
  void select(int64_t b, int64_t j0, int64_t cols, A* ws, int32_t* iws) {
    const int64_t L = first_pos[b], m = n_new[b];
    const int64_t* pos = pos_of(b) + j0;
    A* f = f_of(b) + j0;
    const int64_t sc = select_cols(S);
    A* q_sel = ws;
    A* k_buf = q_sel + c * D;
    A* a = k_buf + sc * D;
    A* run = a + c * sc;
    int32_t* visible_from = iws;        // first chunk query that sees the slot (m: none)
    int32_t* selected_from = iws + sc;  // first chunk query whose S counts for it (m: none)

    const T* qs0 = static_cast<const T*>(p.q) + b * p.q_batch_stride + p.sel_head * p.q_head_stride;
    int64_t ld_q, ld_k;
    const A* qs = load_rows<T, A>(qs0, p.q_row_stride, m, D, q_sel, &ld_q);
    const A* ks = load_rows<T, A>(k_cache_row(b, p.sel_head / g, j0), p.k_cache_row_stride, cols,
                                  D, k_buf, &ld_k);
    gemm_rm<A>(false, true, m, cols, D, scale, qs, ld_q, ks, ld_k, A(0), a, cols);

    const auto mm = static_cast<int32_t>(m);
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t pj = pos[j];
      if (pj < 0) {
        visible_from[j] = selected_from[j] = mm;
      } else if (pj < L) {  // cached before the step: seen by all, selected unless BOS
        visible_from[j] = 0;
        selected_from[j] = pj == 0 ? mm : 0;
      } else {  // chunk token u = pj - L: seen from query u on, selected from u + 1 on
        visible_from[j] = static_cast<int32_t>(pj - L);
        selected_from[j] = pj == 0 ? mm : static_cast<int32_t>(pj - L + 1);
      }
      run[j] = pj < 0 ? A(0) : f[j];
    }
    A* off = offsets.get() + b * c * S + j0;
    for (int64_t t = 0; t < m; ++t) {
      const A* arow = a + t * cols;
      A* ot = off + t * S;
      const auto tt = static_cast<int32_t>(t);
      for (int64_t j = 0; j < cols; ++j) {
        ot[j] = tt >= visible_from[j] ? run[j] : kInf<A>;
        run[j] += tt >= selected_from[j] ? std::max(arow[j], A(0)) : A(0);
      }
    }
    for (int64_t j = 0; j < cols; ++j)
      if (pos[j] >= 0) f[j] = run[j];
  }

  // Step 4 of §3 in one pass. BOS (position 0) is never a candidate.
  void evict(int64_t b, int64_t* cand) const {
    int64_t* pos = pos_of(b);
    const A* f = f_of(b);
    int64_t used = 0, n_cand = 0;
    for (int64_t j = 0; j < S; ++j) {
      if (pos[j] < 0) continue;
      if (p.has_tau && pos[j] > 0 && static_cast<double>(f[j]) > p.tau) {
        pos[j] = -1;
        continue;
      }
      ++used;
      if (pos[j] > 0) cand[n_cand++] = j;
    }
    const int64_t excess = std::min(used - p.budget, n_cand);
    if (excess <= 0) return;
    // Eviction order: larger F first, ties to the older position; NaN (only from non-finite
    // inputs) sorts as +inf so the order stays a strict weak order.
    const auto key = [&](int64_t j) { return std::isnan(f[j]) ? kInf<A> : f[j]; };
    const auto evicted_first = [&](int64_t x, int64_t y) {
      const A kx = key(x), ky = key(y);
      return kx > ky || (kx == ky && pos[x] < pos[y]);
    };
    if (excess < n_cand) std::nth_element(cand, cand + excess, cand + n_cand, evicted_first);
    for (int64_t i = 0; i < excess; ++i) pos[cand[i]] = -1;
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
    // Items: (sequence, kv group, block of its g * m rows), `blocks` slots per group (a ragged
    // batch leaves some empty). Groups are split further only when there are fewer of them than
    // threads, since each block re-reads the group's K and V.
    const int64_t threads = at::get_num_threads();
    const int64_t want = std::max<int64_t>(1, (threads + B * Hkv - 1) / (B * Hkv));
    const auto blocks_of = [&](int64_t b) -> int64_t {
      const int64_t R = g * n_new[b];
      if (R == 0) return 0;
      const int64_t cap = R >= kMinTiledRows ? kBr : kMinTiledRows - 1;
      return std::min(R, std::max((R + cap - 1) / cap, want));
    };
    int64_t blocks = 0;
    bool any_tiled = false, any_rows = false;
    for (int64_t b = 0; b < B; ++b) {
      blocks = std::max(blocks, blocks_of(b));
      if (n_new[b] > 0) (g * n_new[b] >= kMinTiledRows ? any_tiled : any_rows) = true;
    }
    const int64_t per_thread = std::max(any_tiled ? tiled_elems(D, S) : 0,
                                        any_rows ? row_elems(D, S) : 0);
    run_dynamic(B * Hkv * blocks, [&](const auto& next) {
      auto ws = uninit<A>(per_thread);
      for (int64_t i; (i = next()) >= 0;) {
        const int64_t b = i / (Hkv * blocks), hk = (i / blocks) % Hkv, blk = i % blocks;
        const int64_t nblk = blocks_of(b), R = g * n_new[b];
        if (blk >= nblk) continue;
        const int64_t r0 = R * blk / nblk, r1 = R * (blk + 1) / nblk;
        const GroupView<T> gv{&p, b, hk, g, n_new[b], S};
        const A* off = offsets.get() + b * c * S;
        if (R >= kMinTiledRows) {
          tiled_rows<T, A>(gv, off, scale, r0, r1, ws.get());
        } else {
          stream_rows<T, A>(gv, off, scale, r0, r1, ws.get());
        }
      }
    });
  }

  void run() {
    for (int64_t b = 0; b < B; ++b) {
      first_pos[b] = p.seq_len[b];
      n_new[b] = p.lengths ? p.lengths[b] : c;
    }
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) insert(b);
    });
    const int64_t sc = select_cols(S), tiles = (S + sc - 1) / sc;
    run_dynamic(B * tiles, [&](const auto& next) {
      auto ws = uninit<A>(select_elems(c, D, S));
      auto iws = uninit<int32_t>(select_int32(S));
      for (int64_t i; (i = next()) >= 0;) {
        const int64_t b = i / tiles, j0 = (i % tiles) * sc;
        if (n_new[b] > 0) select(b, j0, std::min(sc, S - j0), ws.get(), iws.get());
      }
    });
    attend();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      auto cand = uninit<int64_t>(evict_int64(S));
      for (int64_t b = b0; b < b1; ++b) {
        evict(b, cand.get());
        p.seq_len[b] = first_pos[b] + n_new[b];
      }
    });
  }
};

}  // namespace

void decode_step(const DecodeParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using E = decltype(tag);
    Step<typename E::type, typename E::acc>(p).run();
  });
}

size_t decode_workspace_bytes(int64_t batch, int64_t heads_kv, int64_t chunk, int64_t head_dim,
                              int64_t slots, DType dtype, int64_t threads) {
  (void)heads_kv;  // the scratch is per thread and per sequence, not per head
  const int64_t acc = dtype == DType::kFloat64 ? 8 : 4;
  const int64_t shared = offsets_elems(batch, chunk, slots) * acc + 2 * batch * 8;
  const int64_t select = select_elems(chunk, head_dim, slots) * acc + select_int32(slots) * 4;
  const int64_t attend = std::max(tiled_elems(head_dim, slots), row_elems(head_dim, slots)) * acc;
  const int64_t evict = evict_int64(slots) * 8;
  return static_cast<size_t>(shared + std::max<int64_t>(threads, 1) *
                                          std::max({select, attend, evict}));
}

}  // namespace selattn::cpu
