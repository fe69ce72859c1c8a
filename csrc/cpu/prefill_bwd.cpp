// Fused CPU selective-attention prefill, backward (DESIGN §2).
//
// Work item = (batch b, key block J, chunk of kv heads with all their query heads). The item
// walks query blocks I from last to first; per tile it recomputes A and F once, then per head
// P = exp(s q k^T - F - lse), dP = dout v^T, dL = P * (dP - Dl) with Dl = rowsum(dout * out) -
// dlse, and accumulates dv, dk of its kv heads (owned by the item: no race), a dq tile (added
// under the lock of query block I) and dF = -sum_h dL. The F path keeps, per key column of J,
// the suffix sum of dF over the query rows already visited, which gives dS[k, j] = sum_{i>k}
// dF[i, j] row by row; dA = dS * [A > 0] * [1 <= j < k] then feeds dq_sel (locked add) and
// dk_sel. Because dA is summed over the heads of the item before its two GEMMs, the F path
// costs 3 small GEMMs per tile, not per head.
//
// The auxiliary memory loss (p.dmem) adds dmem[b, i] * [F[i, j] < tau] to dF once per tile,
// in the item holding the first kv-head chunk of (b, J): the dq_sel / dk_sel adds of every
// chunk are summed, so adding it in each chunk would count it once per chunk.
//
// Query blocks run in superchunks (selection_prefix.h), last to first, because the dF suffix
// sum runs backwards: before the first (top) superchunk a forward pre-pass over all earlier
// blocks leaves the carry at the top superchunk's start; each later one retreats the carry by
// its own column sums. An item's dk, dv and dF suffix state lives on from one superchunk to
// the next (in dk / dv themselves for fp32 / fp64 outputs, else in acc_t buffers).
//
// Workspace: Poff of one superchunk (B * blocks * N doubles) and, with more than one
// superchunk, the B * N carry; Dl (B * Hq * N); the dF suffix state (B * N * kv chunks);
// accumulators in the
// accumulation type for dq (B * Hq * N * D), dq_sel and dk_sel (B * N * D each) unless the
// outputs already are that type (fp32 / fp64; with several superchunks dk and dv too), and per
// thread O(kBc * D * kv heads + kBr * kBc)
// tiles, the head part capped at ~1 MiB per buffer.
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <mutex>
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

// A strided (B, H, N, D) tensor of acc_t that gradients are accumulated into: the output itself
// when it already has the accumulation type, else a zeroed contiguous buffer copied out at the
// end.
template <typename acc_t>
struct Accum {
  acc_t* ptr = nullptr;
  int64_t bs, hs, rs;
  std::unique_ptr<acc_t[]> own;
  acc_t* rows(int64_t b, int64_t h, int64_t r) const { return ptr + b * bs + h * hs + r * rs; }
};

template <typename scalar_t, typename acc_t>
Accum<acc_t> make_accum(void* out, int64_t bs, int64_t hs, int64_t rs, int64_t B, int64_t H,
                        int64_t N, int64_t D) {
  Accum<acc_t> a;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (rs >= D || N == 1) {
      a.ptr = static_cast<acc_t*>(out);
      a.bs = bs, a.hs = hs, a.rs = rs;
    }
  }
  if (a.ptr == nullptr) {
    a.own = uninit<acc_t>(B * H * N * D);
    a.ptr = a.own.get();
    a.bs = H * N * D, a.hs = N * D, a.rs = D;
  }
  parallel_light(B * H, N * D, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t r = 0; r < N; ++r) std::fill_n(a.rows(t / H, t % H, r), D, acc_t(0));
  });
  return a;
}

template <typename scalar_t, typename acc_t>
void finish_accum(const Accum<acc_t>& a, void* out, int64_t bs, int64_t hs, int64_t rs,
                  int64_t B, int64_t H, int64_t N, int64_t D) {
  if (!a.own) return;
  parallel_light(B * H, N * D, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / H, h = t % H;
      store_rows<scalar_t, acc_t>(a.rows(b, h, 0), a.rs, N, D,
                                  static_cast<scalar_t*>(out) + b * bs + h * hs, rs);
    }
  });
}

template <typename acc_t>
inline void add_rows(const acc_t* src, int64_t rows, int64_t D, acc_t* dst, int64_t rs) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* d = dst + r * rs;
    const acc_t* s = src + r * D;
    for (int64_t c = 0; c < D; ++c) d[c] += s[c];
  }
}

template <typename scalar_t, typename acc_t>
void bwd_impl(const PrefillParams& p) {
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, N = p.seqlen, D = p.head_dim;
  const int64_t group = Hq / Hkv;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const int64_t nblk_q = (N + kBr - 1) / kBr, nblk_k = (N + kBc - 1) / kBc;

  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* qsel = static_cast<const scalar_t*>(p.q_sel);
  const auto* ksel = static_cast<const scalar_t*>(p.k_sel);
  const auto* out = static_cast<const scalar_t*>(p.out);
  const auto* dout = static_cast<const scalar_t*>(p.dout);
  const auto* lse = static_cast<const acc_t*>(p.lse);
  const auto* dlse = static_cast<const acc_t*>(p.dlse);
  auto* dk = static_cast<scalar_t*>(p.dk);
  auto* dv = static_cast<scalar_t*>(p.dv);
  const auto* dmem = static_cast<const acc_t*>(p.dmem);
  const bool want_mem = dmem != nullptr && p.mem_tau > 0;
  const acc_t mem_tau = static_cast<acc_t>(p.mem_tau);

  const int64_t sc_blocks = superchunk_blocks(
      B, nblk_q, N, B * Hq * N * D * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t nsc = (nblk_q + sc_blocks - 1) / sc_blocks;
  auto poff = uninit<fsum_t>(B * sc_blocks * N);
  std::unique_ptr<fsum_t[]> carry;
  if (nsc > 1) {
    carry = uninit<fsum_t>(B * N);
    std::fill_n(carry.get(), B * N, fsum_t(0));
    // The forward's additions up to the top superchunk, so its Poff has the forward's bits.
    for (int64_t I0 = 0; I0 + sc_blocks < nblk_q; I0 += sc_blocks)
      selection_block_prefix<scalar_t, acc_t>(p, kBr, kBc, I0, I0 + sc_blocks, poff.get(),
                                              carry.get(), CarryMode::kAdvance);
  }

  // Dl[b, h, i] = dout . out - dlse (the dlse term is lse's own gradient, P * dlse).
  auto dl = uninit<acc_t>(B * Hq * N);
  parallel_light(B * Hq, N * D, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / Hq, h = t % Hq;
      const scalar_t* o = out + b * p.out_batch_stride + h * p.out_head_stride;
      const scalar_t* g = dout + b * p.dout_batch_stride + h * p.dout_head_stride;
      for (int64_t i = 0; i < N; ++i) {
        acc_t s = 0;
        const scalar_t* orow = o + i * p.out_row_stride;
        const scalar_t* grow = g + i * p.dout_row_stride;
        for (int64_t d = 0; d < D; ++d)
          s += static_cast<acc_t>(orow[d]) * static_cast<acc_t>(grow[d]);
        dl[t * N + i] = s - (dlse ? dlse[t * N + i] : acc_t(0));
      }
    }
  });

  Accum<acc_t> dq_acc = make_accum<scalar_t, acc_t>(p.dq, p.dq_batch_stride, p.dq_head_stride,
                                                    p.dq_row_stride, B, Hq, N, D);
  Accum<acc_t> dqs_acc = make_accum<scalar_t, acc_t>(p.dq_sel, p.dq_sel_batch_stride, 0,
                                                     p.dq_sel_row_stride, B, 1, N, D);
  Accum<acc_t> dks_acc = make_accum<scalar_t, acc_t>(p.dk_sel, p.dk_sel_batch_stride, 0,
                                                     p.dk_sel_row_stride, B, 1, N, D);
  // dk / dv summed over superchunks (unused with one superchunk: items store them directly).
  Accum<acc_t> dk_acc, dv_acc;
  if (nsc > 1) {
    dk_acc = make_accum<scalar_t, acc_t>(p.dk, p.dk_batch_stride, p.dk_head_stride,
                                         p.dk_row_stride, B, Hkv, N, D);
    dv_acc = make_accum<scalar_t, acc_t>(p.dv, p.dv_batch_stride, p.dv_head_stride,
                                         p.dv_row_stride, B, Hkv, N, D);
  }
  std::unique_ptr<std::mutex[]> qlock(new std::mutex[B * nblk_q]);
  std::unique_ptr<std::mutex[]> klock(new std::mutex[B * nblk_k]);

  // Split kv heads into chunks when there are few (b, J) items.
  const int64_t nthreads = at::get_num_threads();
  int64_t chunks = 1;
  if (B * nblk_k < 4 * nthreads)
    chunks = std::min(Hkv, (4 * nthreads + B * nblk_k - 1) / (B * nblk_k));
  // Cap the per-thread k / v / dk / dv tiles of a chunk at ~1 MiB of fp32 each.
  const int64_t max_kv = std::max<int64_t>(1, (int64_t(1) << 18) / (kBc * D));
  chunks = std::max(chunks, (Hkv + max_kv - 1) / max_kv);
  const int64_t kv_per = (Hkv + chunks - 1) / chunks;
  chunks = (Hkv + kv_per - 1) / kv_per;
  // Per (b, J, kv chunk): sum of -dF over the query rows visited so far (the later rows).
  auto df_suffix = uninit<acc_t>(B * nblk_k * chunks * kBc);

  for (int64_t sc = nsc - 1; sc >= 0; --sc) {
    const int64_t I0 = sc * sc_blocks, I1 = std::min(nblk_q, I0 + sc_blocks), nb = I1 - I0;
    const bool top = sc == nsc - 1;
    selection_block_prefix<scalar_t, acc_t>(
        p, kBr, kBc, I0, I1, poff.get(), carry.get(),
        nsc == 1 ? CarryMode::kNone : top ? CarryMode::kKeep : CarryMode::kRetreat);
    // Key blocks with a key before the superchunk's last row.
    const int64_t nblk_k_sc = (std::min(N, I1 * kBr) + kBc - 1) / kBc;

    run_dynamic(B * nblk_k_sc * chunks, [&](const auto& next) {
      auto k_buf = uninit<acc_t>(kv_per * kBc * D);
      auto v_buf = uninit<acc_t>(kv_per * kBc * D);
      auto ksel_buf = uninit<acc_t>(kBc * D);
      auto dk_buf = uninit<acc_t>(kv_per * kBc * D);
      auto dv_buf = uninit<acc_t>(kv_per * kBc * D);
      auto dks_buf = uninit<acc_t>(kBc * D);
      auto qsel_buf = uninit<acc_t>(kBr * D);
      auto a_buf = uninit<acc_t>(kBr * kBc);
      auto f_buf = uninit<acc_t>(kBr * kBc);
      auto run_buf = uninit<acc_t>(kBc);
      auto dfs_buf = uninit<acc_t>(kBr * kBc);
      auto q_buf = uninit<acc_t>(kBr * D);
      auto do_buf = uninit<acc_t>(kBr * D);
      auto p_buf = uninit<acc_t>(kBr * kBc);
      auto dp_buf = uninit<acc_t>(kBr * kBc);
      auto dqt_buf = uninit<acc_t>(kBr * D);
      std::vector<const acc_t*> kt(kv_per), vt(kv_per);
      std::vector<int64_t> ldk(kv_per), ldv(kv_per);

      for (int64_t it; (it = next()) >= 0;) {
        // Longest first: key block 0 sees every query block.
        const int64_t J = it / (B * chunks);
        const int64_t b = (it / chunks) % B, kv0 = (it % chunks) * kv_per;
        const int64_t kv1 = std::min(Hkv, kv0 + kv_per), nkv = kv1 - kv0;
        const int64_t c0 = J * kBc, cols = std::min(kBc, N - c0);
        // Query blocks that reach key c0, last to first (the dF suffix sum runs backwards).
        const int64_t first_i = c0 / kBr;

        for (int64_t kh = kv0; kh < kv1; ++kh) {
          const int64_t l = kh - kv0;
          kt[l] = load_rows<scalar_t, acc_t>(
              k + b * p.k_batch_stride + kh * p.k_head_stride + c0 * p.k_row_stride, p.k_row_stride,
              cols, D, k_buf.get() + l * kBc * D, &ldk[l]);
          vt[l] = load_rows<scalar_t, acc_t>(
              v + b * p.v_batch_stride + kh * p.v_head_stride + c0 * p.v_row_stride, p.v_row_stride,
              cols, D, v_buf.get() + l * kBc * D, &ldv[l]);
        }
        int64_t ld_ksel, ld_qsel, ld_q, ld_do;
        const acc_t* ks = load_rows<scalar_t, acc_t>(
            ksel + b * p.k_sel_batch_stride + c0 * p.k_sel_row_stride, p.k_sel_row_stride, cols, D,
            ksel_buf.get(), &ld_ksel);
        acc_t* run = df_suffix.get() + ((b * nblk_k + J) * chunks + kv0 / kv_per) * kBc;
        if (top) {
          std::fill_n(dk_buf.get(), nkv * kBc * D, acc_t(0));
          std::fill_n(dv_buf.get(), nkv * kBc * D, acc_t(0));
          std::fill_n(run, cols, acc_t(0));
        } else {
          for (int64_t kh = kv0; kh < kv1; ++kh) {
            const int64_t l = kh - kv0;
            for (int64_t c = 0; c < cols; ++c) {
              std::memcpy(dk_buf.get() + (l * kBc + c) * D, dk_acc.rows(b, kh, c0 + c), sizeof(acc_t) * D);
              std::memcpy(dv_buf.get() + (l * kBc + c) * D, dv_acc.rows(b, kh, c0 + c), sizeof(acc_t) * D);
            }
          }
        }
        std::fill_n(dks_buf.get(), kBc * D, acc_t(0));

        for (int64_t I = I1 - 1; I >= std::max(I0, first_i); --I) {
          const int64_t r0 = I * kBr, rows = std::min(kBr, N - r0);
          const acc_t* qs = load_rows<scalar_t, acc_t>(
              qsel + b * p.q_sel_batch_stride + r0 * p.q_sel_row_stride, p.q_sel_row_stride, rows,
              D, qsel_buf.get(), &ld_qsel);
          acc_t* a = a_buf.get();
          acc_t* f = f_buf.get();
          acc_t* dfs = dfs_buf.get();
          gemm_rm<acc_t>(false, true, rows, cols, D, scale, qs, ld_qsel, ks, ld_ksel, acc_t(0), a,
                         kBc);
          selection_f_tile<acc_t>(a, kBc, poff.get() + (b * nb + I - I0) * N + c0, r0, c0, rows,
                                  cols, f, kBc, run_buf.get());
          std::fill_n(dfs, rows * kBc, acc_t(0));

          for (int64_t h = kv0 * group; h < kv1 * group; ++h) {
            const int64_t l = h / group - kv0;
            const acc_t* qt = load_rows<scalar_t, acc_t>(
                q + b * p.q_batch_stride + h * p.q_head_stride + r0 * p.q_row_stride,
                p.q_row_stride, rows, D, q_buf.get(), &ld_q);
            const acc_t* dot = load_rows<scalar_t, acc_t>(
                dout + b * p.dout_batch_stride + h * p.dout_head_stride + r0 * p.dout_row_stride,
                p.dout_row_stride, rows, D, do_buf.get(), &ld_do);
            acc_t* pt = p_buf.get();
            acc_t* dpt = dp_buf.get();
            gemm_rm<acc_t>(false, true, rows, cols, D, scale, qt, ld_q, kt[l], ldk[l], acc_t(0), pt,
                           kBc);
            gemm_rm<acc_t>(false, true, rows, cols, D, acc_t(1), dot, ld_do, vt[l], ldv[l],
                           acc_t(0), dpt, kBc);
            const acc_t* lse_h = lse + (b * Hq + h) * N + r0;
            const acc_t* dl_h = dl.get() + (b * Hq + h) * N + r0;
            using Vec = at::vec::Vectorized<acc_t>;
            constexpr int64_t W = Vec::size();
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* pr = pt + r * kBc;
              acc_t* dpr = dpt + r * kBc;
              acc_t* dfr = dfs + r * kBc;
              const acc_t* fr = f + r * kBc;
              const int64_t valid = std::max<int64_t>(0, std::min(cols, r0 + r - c0 + 1));
              const Vec vl(lse_h[r]), vd(dl_h[r]);
              int64_t c = 0;
              for (; c + W <= valid; c += W) {
                const Vec pv = vexp(Vec::loadu(pr + c) - Vec::loadu(fr + c) - vl);
                const Vec dlv = pv * (Vec::loadu(dpr + c) - vd);
                pv.store(pr + c);
                dlv.store(dpr + c);
                (Vec::loadu(dfr + c) + dlv).store(dfr + c);
              }
              for (; c < valid; ++c) {
                const acc_t pv = std::exp(pr[c] - fr[c] - lse_h[r]);
                const acc_t dlv = pv * (dpr[c] - dl_h[r]);
                pr[c] = pv;
                dpr[c] = dlv;
                dfr[c] += dlv;
              }
              for (; c < cols; ++c) pr[c] = dpr[c] = acc_t(0);
            }
            // dpt now holds dL.
            gemm_rm<acc_t>(true, false, cols, D, rows, acc_t(1), pt, kBc, dot, ld_do, acc_t(1),
                           dv_buf.get() + l * kBc * D, D);
            gemm_rm<acc_t>(true, false, cols, D, rows, scale, dpt, kBc, qt, ld_q, acc_t(1),
                           dk_buf.get() + l * kBc * D, D);
            gemm_rm<acc_t>(false, false, rows, D, cols, scale, dpt, kBc, kt[l], ldk[l], acc_t(0),
                           dqt_buf.get(), D);
            {
              std::lock_guard<std::mutex> guard(qlock[b * nblk_q + I]);
              add_rows(dqt_buf.get(), rows, D, dq_acc.rows(b, h, r0), dq_acc.rs);
            }
          }

          // dfs holds sum_h dL_h = -dF, so the memory term dF += dmem * [F < tau] (keys j <= i
          // only) is subtracted. At F == tau the clip is saturated: gradient 0, as relu at 0.
          if (want_mem && kv0 == 0) {
            const acc_t* dmem_b = dmem + b * N + r0;
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t valid = std::max<int64_t>(0, std::min(cols, r0 + r - c0 + 1));
              const acc_t g = dmem_b[r];
              const acc_t* fr = f + r * kBc;
              acc_t* dfr = dfs + r * kBc;
              for (int64_t c = 0; c < valid; ++c) dfr[c] -= fr[c] < mem_tau ? g : acc_t(0);
            }
          }

          // dS[k, j] = sum_{i > k} dF[i, j] with dF = -sum_h dL_h; overwrite A with dA.
          for (int64_t r = rows - 1; r >= 0; --r) {
            acc_t* ar = a + r * kBc;
            int64_t lo, hi;
            selection_cols(r0 + r, c0, cols, &lo, &hi);
            for (int64_t c = 0; c < lo; ++c) ar[c] = acc_t(0);
            for (int64_t c = lo; c < hi; ++c) ar[c] = ar[c] > acc_t(0) ? run[c] : acc_t(0);
            for (int64_t c = hi; c < cols; ++c) ar[c] = acc_t(0);
            const acc_t* dfr = dfs + r * kBc;
            for (int64_t c = 0; c < cols; ++c) run[c] -= dfr[c];
          }
          gemm_rm<acc_t>(false, false, rows, D, cols, scale, a, kBc, ks, ld_ksel, acc_t(0),
                         dqt_buf.get(), D);
          {
            std::lock_guard<std::mutex> guard(qlock[b * nblk_q + I]);
            add_rows(dqt_buf.get(), rows, D, dqs_acc.rows(b, 0, r0), dqs_acc.rs);
          }
          gemm_rm<acc_t>(true, false, cols, D, rows, scale, a, kBc, qs, ld_qsel, acc_t(1),
                         dks_buf.get(), D);
        }

        for (int64_t kh = kv0; kh < kv1; ++kh) {
          const int64_t l = kh - kv0;
          if (nsc > 1) {
            for (int64_t c = 0; c < cols; ++c) {
              std::memcpy(dk_acc.rows(b, kh, c0 + c), dk_buf.get() + (l * kBc + c) * D, sizeof(acc_t) * D);
              std::memcpy(dv_acc.rows(b, kh, c0 + c), dv_buf.get() + (l * kBc + c) * D, sizeof(acc_t) * D);
            }
            continue;
          }
          store_rows<scalar_t, acc_t>(
              dk_buf.get() + l * kBc * D, D, cols, D,
              dk + b * p.dk_batch_stride + kh * p.dk_head_stride + c0 * p.dk_row_stride,
              p.dk_row_stride);
          store_rows<scalar_t, acc_t>(
              dv_buf.get() + l * kBc * D, D, cols, D,
              dv + b * p.dv_batch_stride + kh * p.dv_head_stride + c0 * p.dv_row_stride,
              p.dv_row_stride);
        }
        {
          std::lock_guard<std::mutex> guard(klock[b * nblk_k + J]);
          add_rows(dks_buf.get(), cols, D, dks_acc.rows(b, 0, c0), dks_acc.rs);
        }
      }
    });
  }

  if (nsc > 1) {
    finish_accum<scalar_t, acc_t>(dk_acc, p.dk, p.dk_batch_stride, p.dk_head_stride,
                                  p.dk_row_stride, B, Hkv, N, D);
    finish_accum<scalar_t, acc_t>(dv_acc, p.dv, p.dv_batch_stride, p.dv_head_stride,
                                  p.dv_row_stride, B, Hkv, N, D);
  }
  finish_accum<scalar_t, acc_t>(dq_acc, p.dq, p.dq_batch_stride, p.dq_head_stride,
                                p.dq_row_stride, B, Hq, N, D);
  finish_accum<scalar_t, acc_t>(dqs_acc, p.dq_sel, p.dq_sel_batch_stride, 0,
                                p.dq_sel_row_stride, B, 1, N, D);
  finish_accum<scalar_t, acc_t>(dks_acc, p.dk_sel, p.dk_sel_batch_stride, 0,
                                p.dk_sel_row_stride, B, 1, N, D);
}

}  // namespace

void prefill_bwd(const PrefillParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    bwd_impl<typename T::type, typename T::acc>(p);
  });
}

}  // namespace selattn::cpu
