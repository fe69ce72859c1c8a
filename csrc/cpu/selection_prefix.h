// Pre-pass of both CPU prefill kernels (DESIGN §4): per batch element and query block I of
// `br` rows, Poff[I, j] = sum of S[k, j] over all rows k in blocks before I. With it, any F tile
// is Poff plus an exclusive cumsum inside its own query block, so the main passes never need
// more than one tile of S at a time.
//
// Bounded workspace: the query blocks are taken in superchunks of `blocks` consecutive blocks;
// only one superchunk's Poff rows exist at a time (batch * blocks * N doubles), and a running
// column sum (batch * N doubles, the "carry") links one superchunk to the next. Row [b][I - I0]
// of the workspace is defined for j < min(N, (I + 1) * br).
#pragma once

#include <cstdlib>

#include "cpu/tile_math.h"

namespace selattn::cpu {

// How many query blocks one superchunk holds. The workspace (blocks * B * N doubles) is kept
// under max(size of q / 8, 16 MiB) (README "Memory"): well below plain attention's own O(N)
// tensors, and large enough that N <= 8K (B = 1, H = 8, D = 64) runs as one superchunk, i.e.
// without the carry. SELATTN_CPU_SUPERCHUNK_BLOCKS=n forces n blocks (tests of the carry).
inline int64_t superchunk_blocks(int64_t batch, int64_t nblk, int64_t seqlen, int64_t q_bytes) {
  if (const char* env = std::getenv("SELATTN_CPU_SUPERCHUNK_BLOCKS")) {
    const long long forced = std::atoll(env);
    if (forced > 0) return std::min<int64_t>(nblk, forced);
  }
  const int64_t budget = std::max<int64_t>(q_bytes / 8, int64_t(16) << 20);
  const int64_t row_bytes = batch * seqlen * static_cast<int64_t>(sizeof(fsum_t));
  return std::clamp<int64_t>(budget / std::max<int64_t>(row_bytes, 1), 1, std::max<int64_t>(nblk, 1));
}

// What the prefix pass does with the carry (B x N running column sums):
//   kNone     no carry: the superchunk starts at block 0 (Poff starts at 0), nothing recorded;
//   kAdvance  carry holds the sums of all rows before block I0; on return, before block I1;
//   kKeep     carry holds the sums before block I0 and is left as it is;
//   kRetreat  carry holds the sums before block I1; on return, before block I0 (the backward
//             walks superchunks from last to first). The subtraction rounds differently from
//             the forward's additions, by ~1e-16 relative in double, far below acc_t's ulp.
enum class CarryMode { kNone, kAdvance, kKeep, kRetreat };

// Fills poff[(b * (I1 - I0) + I - I0) * N + j] = Poff[I, j] for query blocks I0 <= I < I1.
template <typename scalar_t, typename acc_t>
void selection_block_prefix(const PrefillParams& p, int64_t br, int64_t bc, int64_t I0, int64_t I1,
                            fsum_t* poff, fsum_t* carry, CarryMode mode) {
  const int64_t B = p.batch, N = p.seqlen, D = p.head_dim;
  const int64_t nb = I1 - I0;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const auto* qsel = static_cast<const scalar_t*>(p.q_sel);
  const auto* ksel = static_cast<const scalar_t*>(p.k_sel);

  // Column sums of S per query block, written where Poff will live. Item order: most keys first.
  run_dynamic(B * nb, [&](const auto& next) {
    auto qbuf = uninit<acc_t>(br * D);
    auto kbuf = uninit<acc_t>(bc * D);
    auto abuf = uninit<acc_t>(br * bc);
    auto colsum = uninit<acc_t>(bc);
    for (int64_t it; (it = next()) >= 0;) {
      const int64_t I = I1 - 1 - it / B, b = it % B;
      const int64_t r0 = I * br, rows = std::min(br, N - r0), end = r0 + rows;
      fsum_t* csum = poff + (b * nb + I - I0) * N;
      int64_t ldq, ldk;
      const acc_t* qt = load_rows<scalar_t, acc_t>(qsel + b * p.q_sel_batch_stride + r0 * p.q_sel_row_stride,
                                                   p.q_sel_row_stride, rows, D, qbuf.get(), &ldq);
      // Keys j >= r0 + rows - 1 never have a score in this block (j < i).
      for (int64_t c0 = 0; c0 < end; c0 += bc) {
        const int64_t cols = std::min(bc, end - c0);
        const acc_t* kt = load_rows<scalar_t, acc_t>(ksel + b * p.k_sel_batch_stride + c0 * p.k_sel_row_stride,
                                                     p.k_sel_row_stride, cols, D, kbuf.get(), &ldk);
        gemm_rm<acc_t>(false, true, rows, cols, D, scale, qt, ldq, kt, ldk, acc_t(0), abuf.get(), bc);
        acc_t* sums = colsum.get();
        std::fill(sums, sums + cols, acc_t(0));
        for (int64_t r = 0; r < rows; ++r) {
          int64_t lo, hi;
          selection_cols(r0 + r, c0, cols, &lo, &hi);
          add_relu(abuf.get() + r * bc, lo, hi, sums);
        }
        for (int64_t c = 0; c < cols; ++c) csum[c0 + c] = sums[c];
      }
    }
  });

  // Exclusive prefix over blocks, in place, one column range per task. The additions run in
  // block order from block 0 whatever the superchunk size, so kAdvance superchunks give the
  // same Poff bits as one superchunk over all blocks.
  constexpr int64_t kCols = 256;
  const int64_t col_chunks = (N + kCols - 1) / kCols;
  parallel_light(B * col_chunks, nb * kCols, [&](int64_t begin, int64_t stop) {
    fsum_t run[kCols];
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t b = t / col_chunks, j0 = (t % col_chunks) * kCols;
      const int64_t w = std::min(kCols, N - j0);
      fsum_t* saved = carry != nullptr && mode != CarryMode::kNone ? carry + b * N + j0 : nullptr;
      if (saved != nullptr) {
        std::copy(saved, saved + w, run);
      } else {
        std::fill(run, run + w, fsum_t(0));
      }
      if (mode == CarryMode::kRetreat) {
        // Sums before I0 = sums before I1 minus this superchunk's column sums.
        for (int64_t I = I0; I < I1; ++I) {
          const int64_t end = std::min(N, (I + 1) * br);
          if (end <= j0) continue;
          const fsum_t* row = poff + (b * nb + I - I0) * N + j0;
          const int64_t n = std::min(w, end - j0);
          for (int64_t c = 0; c < n; ++c) run[c] -= row[c];
        }
        std::copy(run, run + w, saved);
      }
      for (int64_t I = I0; I < I1; ++I) {
        const int64_t end = std::min(N, (I + 1) * br);
        if (end <= j0) continue;
        fsum_t* row = poff + (b * nb + I - I0) * N + j0;
        const int64_t n = std::min(w, end - j0);
        for (int64_t c = 0; c < n; ++c) {
          const fsum_t s = row[c];
          row[c] = run[c];
          run[c] += s;
        }
      }
      if (mode == CarryMode::kAdvance) std::copy(run, run + w, saved);
    }
  });
}

}  // namespace selattn::cpu
