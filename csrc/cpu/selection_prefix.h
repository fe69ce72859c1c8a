// Pre-pass of both CPU prefill kernels (DESIGN §4): per batch element and query block I of
// `br` rows, Poff[I, j] = sum of S[k, j] over all rows k in blocks before I. With it, any F tile
// is Poff plus an exclusive cumsum inside its own query block, so the main passes never need
// more than one tile of S at a time.
//
// Workspace: batch * ceil(N / br) * N doubles (fsum_t) (the only O(N^2 / br) memory); entry
// [b][I][j] is defined for j < min(N, (I + 1) * br).
#pragma once

#include "cpu/tile_math.h"

namespace selattn::cpu {

template <typename scalar_t, typename acc_t>
void selection_block_prefix(const PrefillParams& p, int64_t br, int64_t bc, fsum_t* poff) {
  const int64_t B = p.batch, N = p.seqlen, D = p.head_dim;
  const int64_t nblk = (N + br - 1) / br;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const auto* qsel = static_cast<const scalar_t*>(p.q_sel);
  const auto* ksel = static_cast<const scalar_t*>(p.k_sel);

  // Column sums of S per query block, written where Poff will live. Item order: most keys first.
  run_dynamic(B * nblk, [&](const auto& next) {
    auto qbuf = uninit<acc_t>(br * D);
    auto kbuf = uninit<acc_t>(bc * D);
    auto abuf = uninit<acc_t>(br * bc);
    auto colsum = uninit<acc_t>(bc);
    for (int64_t it; (it = next()) >= 0;) {
      const int64_t I = nblk - 1 - it / B, b = it % B;
      const int64_t r0 = I * br, rows = std::min(br, N - r0), end = r0 + rows;
      fsum_t* csum = poff + (b * nblk + I) * N;
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

  // Exclusive prefix over blocks, in place, one column range per task.
  constexpr int64_t kCols = 256;
  const int64_t col_chunks = (N + kCols - 1) / kCols;
  at::parallel_for(0, B * col_chunks, 1, [&](int64_t begin, int64_t stop) {
    fsum_t carry[kCols];
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t b = t / col_chunks, j0 = (t % col_chunks) * kCols;
      const int64_t w = std::min(kCols, N - j0);
      std::fill(carry, carry + w, fsum_t(0));
      for (int64_t I = 0; I < nblk; ++I) {
        const int64_t end = std::min(N, (I + 1) * br);
        if (end <= j0) continue;
        fsum_t* row = poff + (b * nblk + I) * N + j0;
        const int64_t n = std::min(w, end - j0);
        for (int64_t c = 0; c < n; ++c) {
          const fsum_t s = row[c];
          row[c] = carry[c];
          carry[c] += s;
        }
      }
    }
  });
}

}  // namespace selattn::cpu
