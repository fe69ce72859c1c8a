// Fused CPU selective-attention prefill, forward (DESIGN §1, §4 "CPU").
//
// Work item = (batch b, query block I of kBr rows, chunk of query heads). For each key block J
// <= I the item builds the F tile once (selection logits A = s q_sel k_sel^T, relu + structural
// mask, exclusive cumsum inside the block on top of the Poff pre-pass) and applies it to every
// head of its chunk, each with its own online-softmax state; so the selection costs one extra
// small GEMM per tile instead of one per head.
//
// With p.mem set, the item that holds the first head chunk of (b, I) also sums min(F, tau) over
// each row of its F tiles: the auxiliary memory loss's R[b, i], computed once per row whatever
// the head split, from the same tiles the attention uses.
//
// Query blocks run in superchunks (selection_prefix.h): the pre-pass of one superchunk, then its
// attention items, then the next superchunk with the carried column sums.
//
// Workspace: Poff of one superchunk, B * blocks * N doubles (selection_prefix.h), plus the
// B * N carry when there is more than one superchunk; per thread O(kBr * D * heads + (kBr + kBc) * D
// + kBr * kBc) scratch, the head part capped at ~1 MiB. Nothing is N x N.
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/prefill_cpu.h"
#include "cpu/selection_prefix.h"
#include "cpu/tile_math.h"

namespace selattn::cpu {
namespace {

// Tile sizes, tuned on a 2-core Sapphire Rapids (N=2048, D=64, fp32): MKL's small-GEMM
// efficiency favours wide tiles; the F tile and per-head accumulators still fit in L2.
constexpr int64_t kBr = 128;  // query rows per block (also the Poff block)
constexpr int64_t kBc = 256;  // keys per tile

// x = S - F on the first `valid` columns; returns their max.
template <typename acc_t>
inline acc_t subtract_and_max(acc_t* s, const acc_t* f, int64_t valid) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec vmax(-std::numeric_limits<acc_t>::infinity());
  int64_t c = 0;
  for (; c + W <= valid; c += W) {
    Vec x = Vec::loadu(s + c) - Vec::loadu(f + c);
    x.store(s + c);
    vmax = at::vec::clamp_min(x, vmax);  // max without NaN checks
  }
  acc_t m = at::vec::vec_reduce_all<acc_t>(
      [](Vec& a, Vec& b) { return at::vec::clamp_min(a, b); }, vmax);
  for (; c < valid; ++c) {
    s[c] -= f[c];
    m = std::max(m, s[c]);
  }
  return m;
}

// s[c] = exp(s[c] - m) for c < valid, 0 up to cols; returns the sum.
template <typename acc_t>
inline acc_t exp_and_sum(acc_t* s, acc_t m, int64_t valid, int64_t cols) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vm(m);
  Vec vsum(acc_t(0));
  int64_t c = 0;
  for (; c + W <= valid; c += W) {
    Vec e = vexp(Vec::loadu(s + c) - vm);
    e.store(s + c);
    vsum = vsum + e;
  }
  acc_t tail = 0;
  for (; c < valid; ++c) {
    s[c] = std::exp(s[c] - m);
    tail += s[c];
  }
  for (; c < cols; ++c) s[c] = acc_t(0);
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vsum) + tail;
}

// sum_{c < valid} min(f[c], tau), accumulated in acc_t over one tile row (<= kBc terms).
template <typename acc_t>
inline acc_t clipped_sum(const acc_t* f, acc_t tau, int64_t valid) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vt(tau);
  Vec vsum(acc_t(0));
  int64_t c = 0;
  for (; c + W <= valid; c += W) vsum = vsum + at::vec::minimum(Vec::loadu(f + c), vt);
  acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; c < valid; ++c) s += std::min(f[c], tau);
  return s;
}

template <typename scalar_t, typename acc_t>
void fwd_impl(const PrefillParams& p) {
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, N = p.seqlen, D = p.head_dim;
  const int64_t group = Hq / Hkv;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const int64_t nblk = (N + kBr - 1) / kBr;

  const int64_t sc_blocks = superchunk_blocks(
      B, nblk, N, B * p.heads_q * N * D * static_cast<int64_t>(sizeof(scalar_t)));
  auto poff = uninit<fsum_t>(B * sc_blocks * N);
  std::unique_ptr<fsum_t[]> carry;
  if (sc_blocks < nblk) {
    carry = uninit<fsum_t>(B * N);
    std::fill_n(carry.get(), B * N, fsum_t(0));
  }

  // Enough items for dynamic balancing: split heads when there are few (b, I) pairs.
  const int64_t nthreads = at::get_num_threads();
  int64_t chunks = 1;
  const int64_t items = B * sc_blocks;  // (b, I) pairs of one superchunk
  if (items < 4 * nthreads) chunks = std::min(Hq, (4 * nthreads + items - 1) / items);
  // Cap the per-thread q / output accumulators of a chunk at ~1 MiB of fp32.
  const int64_t max_heads = std::max<int64_t>(1, (int64_t(1) << 18) / (kBr * D));
  chunks = std::max(chunks, (Hq + max_heads - 1) / max_heads);
  const int64_t heads_per = (Hq + chunks - 1) / chunks;
  chunks = (Hq + heads_per - 1) / heads_per;

  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* qsel = static_cast<const scalar_t*>(p.q_sel);
  const auto* ksel = static_cast<const scalar_t*>(p.k_sel);
  auto* out = static_cast<scalar_t*>(p.out);
  auto* lse = static_cast<acc_t*>(p.lse);
  auto* mem = static_cast<acc_t*>(p.mem);
  const bool want_mem = mem != nullptr && p.mem_tau > 0;
  const acc_t mem_tau = static_cast<acc_t>(p.mem_tau);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  for (int64_t I0 = 0; I0 < nblk; I0 += sc_blocks) {
    const int64_t I1 = std::min(nblk, I0 + sc_blocks), nb = I1 - I0;
    selection_block_prefix<scalar_t, acc_t>(p, kBr, kBc, I0, I1, poff.get(), carry.get(),
                                            carry ? CarryMode::kAdvance : CarryMode::kNone);
    run_dynamic(B * nb * chunks, [&](const auto& next) {
      auto qsel_buf = uninit<acc_t>(kBr * D);
      auto ksel_buf = uninit<acc_t>(kBc * D);
      auto a_buf = uninit<acc_t>(kBr * kBc);
      auto f_buf = uninit<acc_t>(kBr * kBc);
      auto run_buf = uninit<acc_t>(kBc);
      auto s_buf = uninit<acc_t>(kBr * kBc);
      auto q_buf = uninit<acc_t>(heads_per * kBr * D);
      auto k_buf = uninit<acc_t>(kBc * D);
      auto v_buf = uninit<acc_t>(kBc * D);
      auto mem_row = uninit<fsum_t>(kBr);  // R of the block's rows, summed over key tiles
      auto o_acc = uninit<acc_t>(heads_per * kBr * D);
      auto m_acc = uninit<acc_t>(heads_per * kBr);
      auto l_acc = uninit<acc_t>(heads_per * kBr);
      std::vector<const acc_t*> qt(heads_per);
      std::vector<int64_t> qld(heads_per);

      for (int64_t it; (it = next()) >= 0;) {
        const int64_t I = I1 - 1 - it / (B * chunks);
        const int64_t b = (it / chunks) % B, h0 = (it % chunks) * heads_per;
        const int64_t h1 = std::min(Hq, h0 + heads_per), nh = h1 - h0;
        const int64_t r0 = I * kBr, rows = std::min(kBr, N - r0), end = r0 + rows;
        const fsum_t* poff_row = poff.get() + (b * nb + I - I0) * N;
        // Every head chunk of (b, I) builds the same F tiles; only the first one sums R.
        const bool sum_mem = want_mem && h0 == 0;
        if (sum_mem) std::fill_n(mem_row.get(), rows, fsum_t(0));

        int64_t ld_qsel, ld_ksel, ld_k = 0, ld_v = 0;
        const acc_t* qs = load_rows<scalar_t, acc_t>(
            qsel + b * p.q_sel_batch_stride + r0 * p.q_sel_row_stride, p.q_sel_row_stride, rows, D,
            qsel_buf.get(), &ld_qsel);
        for (int64_t h = h0; h < h1; ++h) {
          qt[h - h0] = load_rows<scalar_t, acc_t>(
              q + b * p.q_batch_stride + h * p.q_head_stride + r0 * p.q_row_stride, p.q_row_stride,
              rows, D, q_buf.get() + (h - h0) * kBr * D, &qld[h - h0]);
        }
        std::fill(o_acc.get(), o_acc.get() + nh * kBr * D, acc_t(0));
        std::fill(m_acc.get(), m_acc.get() + nh * kBr, kNegInf);
        std::fill(l_acc.get(), l_acc.get() + nh * kBr, acc_t(0));

        for (int64_t c0 = 0; c0 < end; c0 += kBc) {
          const int64_t cols = std::min(kBc, end - c0);
          const acc_t* ks = load_rows<scalar_t, acc_t>(
              ksel + b * p.k_sel_batch_stride + c0 * p.k_sel_row_stride, p.k_sel_row_stride, cols,
              D, ksel_buf.get(), &ld_ksel);
          gemm_rm<acc_t>(false, true, rows, cols, D, scale, qs, ld_qsel, ks, ld_ksel, acc_t(0),
                         a_buf.get(), kBc);
          selection_f_tile<acc_t>(a_buf.get(), kBc, poff_row + c0, r0, c0, rows, cols, f_buf.get(),
                                  kBc, run_buf.get());
          if (sum_mem) {
            // Only keys j <= i: the tile's entries beyond the diagonal are not part of the row.
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t valid = std::min(cols, r0 + r - c0 + 1);
              if (valid > 0) mem_row[r] += clipped_sum(f_buf.get() + r * kBc, mem_tau, valid);
            }
          }

          int64_t loaded_kv = -1;
          const acc_t* kt = nullptr;
          const acc_t* vt = nullptr;
          for (int64_t h = h0; h < h1; ++h) {
            const int64_t kvh = h / group, hl = h - h0;
            if (kvh != loaded_kv) {
              kt = load_rows<scalar_t, acc_t>(
                  k + b * p.k_batch_stride + kvh * p.k_head_stride + c0 * p.k_row_stride,
                  p.k_row_stride, cols, D, k_buf.get(), &ld_k);
              vt = load_rows<scalar_t, acc_t>(
                  v + b * p.v_batch_stride + kvh * p.v_head_stride + c0 * p.v_row_stride,
                  p.v_row_stride, cols, D, v_buf.get(), &ld_v);
              loaded_kv = kvh;
            }
            acc_t* s = s_buf.get();
            gemm_rm<acc_t>(false, true, rows, cols, D, scale, qt[hl], qld[hl], kt, ld_k, acc_t(0),
                           s, kBc);
            acc_t* o = o_acc.get() + hl * kBr * D;
            acc_t* m = m_acc.get() + hl * kBr;
            acc_t* l = l_acc.get() + hl * kBr;
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* sr = s + r * kBc;
              // Causal: keys c0 .. i only. A row can end before this tile when kBc > kBr.
              const int64_t valid = std::min(cols, r0 + r - c0 + 1);
              if (valid <= 0) {
                std::fill(sr, sr + cols, acc_t(0));
                continue;
              }
              const acc_t tile_max = subtract_and_max(sr, f_buf.get() + r * kBc, valid);
              const acc_t m_new = std::max(m[r], tile_max);
              const acc_t sum = exp_and_sum(sr, m_new, valid, cols);
              if (m[r] != m_new) {
                const acc_t alpha = std::exp(m[r] - m_new);  // 0 on the first tile
                if (m[r] != kNegInf) {
                  acc_t* orow = o + r * D;
                  for (int64_t d = 0; d < D; ++d) orow[d] *= alpha;
                }
                l[r] = l[r] * alpha + sum;
                m[r] = m_new;
              } else {
                l[r] += sum;
              }
            }
            gemm_rm<acc_t>(false, false, rows, D, cols, acc_t(1), s, kBc, vt, ld_v, acc_t(1), o, D);
          }
        }

        if (sum_mem) {
          for (int64_t r = 0; r < rows; ++r) mem[b * N + r0 + r] = static_cast<acc_t>(mem_row[r]);
        }
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t hl = h - h0;
          acc_t* o = o_acc.get() + hl * kBr * D;
          const acc_t* m = m_acc.get() + hl * kBr;
          const acc_t* l = l_acc.get() + hl * kBr;
          for (int64_t r = 0; r < rows; ++r) {
            const acc_t inv = acc_t(1) / l[r];
            for (int64_t d = 0; d < D; ++d) o[r * D + d] *= inv;
            lse[(b * Hq + h) * N + r0 + r] = m[r] + std::log(l[r]);
          }
          store_rows<scalar_t, acc_t>(o, D, rows, D,
                                      out + b * p.out_batch_stride + h * p.out_head_stride +
                                          r0 * p.out_row_stride,
                                      p.out_row_stride);
        }
      }
    });
  }
}

}  // namespace

void prefill_fwd(const PrefillParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    fwd_impl<typename T::type, typename T::acc>(p);
  });
}

}  // namespace selattn::cpu
