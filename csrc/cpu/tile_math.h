// Small building blocks shared by the CPU prefill kernels: row-major GEMM on tiles, tile loads
// into the accumulation type, vector exp, dynamic work scheduling and the selection (F) tiles.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "prefill_params.h"


// BLAS entry points that torch's x86 builds export from their bundled MKL. The typed
// cpublas::gemm overloads that reach MKL are not exported from libtorch, so an extension
// cannot call them (nor gemm_stub, whose dispatch ABI depends on torch's build flags).
// Declared weak, these resolve to MKL when torch ships it; otherwise a plain loop runs.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace selattn::cpu {

// Column-major (BLAS) C(m x n) = alpha * op(A) op(B) + beta * C.
template <typename T>
inline void gemm_cm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                    const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
#ifndef SELATTN_CPU_PORTABLE_GEMM  // define to test the fallback below
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  }
#endif
  // Portable fallback (torch builds without an exported BLAS): plain loops.
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T acc = 0;
      for (int64_t l = 0; l < k; ++l)
        acc += (trans_a ? a[i * lda + l] : a[l * lda + i]) * (trans_b ? b[l * ldb + j] : b[j * ldb + l]);
      c[j * ldc + i] = alpha * acc + (beta == T(0) ? T(0) : beta * c[j * ldc + i]);
    }
  }
}

// Row-major C(m x n) = alpha * op(A) op(B) + beta * C. The memory of a row-major matrix is its
// column-major transpose, so C^T = op(B)^T op(A)^T is the BLAS call with the operands (and
// their transpose flags) swapped.
template <typename T>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                    const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  gemm_cm<T>(trans_b, trans_a, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Rows [0, rows) x [0, d) of a strided tensor as a row-major acc_t matrix. Same-type rows with a
// BLAS-legal stride are used in place (*ld = stride); others are converted into `scratch`
// (rows * d elements, *ld = d). Returns the matrix.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_rows(const scalar_t* src, int64_t row_stride, int64_t rows, int64_t d,
                              acc_t* scratch, int64_t* ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (row_stride >= d) {
      *ld = row_stride;
      return src;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * row_stride;
    acc_t* t = scratch + r * d;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(t, s, sizeof(acc_t) * d);
    } else {
      at::vec::convert(s, t, d);
    }
  }
  *ld = d;
  return scratch;
}

// Writes a row-major acc_t block into strided output rows.
template <typename scalar_t, typename acc_t>
inline void store_rows(const acc_t* src, int64_t ld, int64_t rows, int64_t d, scalar_t* dst,
                       int64_t row_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(dst + r * row_stride, src + r * ld, sizeof(acc_t) * d);
    } else {
      at::vec::convert(src + r * ld, dst + r * row_stride, d);
    }
  }
}

inline at::vec::Vectorized<float> vexp(const at::vec::Vectorized<float>& x) { return x.exp_u20(); }
inline at::vec::Vectorized<double> vexp(const at::vec::Vectorized<double>& x) { return x.exp(); }

// Scalar type of the kernel's element pointers for a DType.
template <DType> struct ElementOf;
template <> struct ElementOf<DType::kFloat32> { using type = float; using acc = float; };
template <> struct ElementOf<DType::kFloat64> { using type = double; using acc = double; };
template <> struct ElementOf<DType::kBFloat16> { using type = c10::BFloat16; using acc = float; };
template <> struct ElementOf<DType::kFloat16> { using type = c10::Half; using acc = float; };

template <typename Fn>
inline void dispatch_dtype(DType t, const Fn& fn) {
  switch (t) {
    case DType::kFloat32: fn(ElementOf<DType::kFloat32>{}); break;
    case DType::kFloat64: fn(ElementOf<DType::kFloat64>{}); break;
    case DType::kBFloat16: fn(ElementOf<DType::kBFloat16>{}); break;
    case DType::kFloat16: fn(ElementOf<DType::kFloat16>{}); break;
  }
}

// Runs body(next) on up to num_threads threads; next() hands out item indices 0..n-1 in order
// (or -1 when none are left). Items are numbered longest-first by the callers, so greedy dynamic
// claiming balances the causal triangle and also copes with a busy machine, which the static
// chunks of at::parallel_for do not.
template <typename Body>
inline void run_dynamic(int64_t n_items, const Body& body) {
  if (n_items <= 0) return;
  std::atomic<int64_t> counter{0};
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    // MKL called from inside a parallel region may open a nested team per call; keep each
    // tile GEMM on its calling thread.
    const int prev_mkl = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t t = begin; t < end; ++t) {
      body([&]() -> int64_t {
        const int64_t i = counter.fetch_add(1, std::memory_order_relaxed);
        return i < n_items ? i : -1;
      });
    }
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_mkl);
  });
}

// at::parallel_for over n items of about `work` elements each, run inline when the total is
// small: the O(N) passes around the tile loops (zero fills, Dl, conversions, the Poff prefix)
// cost ~1/N of the kernel, while every parallel region is a fork and a join that, on a busy
// machine, waits for whichever thread the scheduler parked.
template <typename Fn>
inline void parallel_light(int64_t n, int64_t work, const Fn& fn) {
  constexpr int64_t kInlineElems = int64_t(1) << 24;
  at::parallel_for(0, n, std::max<int64_t>(1, kInlineElems / std::max<int64_t>(work, 1)), fn);
}

template <typename T>
inline std::unique_ptr<T[]> uninit(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// Key columns [lo, hi) of row i (tile columns start at key c0, `cols` wide) that carry a
// selection score: 1 <= j < i.
inline void selection_cols(int64_t i, int64_t c0, int64_t cols, int64_t* lo, int64_t* hi) {
  *lo = std::max<int64_t>(1, c0) - c0;
  *hi = std::min<int64_t>(i, c0 + cols) - c0;
  if (*hi < *lo) *hi = *lo;
}

// Poff (the sum of S over all earlier query blocks, up to N terms) is accumulated in double,
// like torch's CPU cumsum, so its rounding stays below the fp32 error of the logits; the short
// sums inside one block stay in acc_t, where they vectorise.
using fsum_t = double;

// dst[c] += relu(src[c]) for c in [lo, hi).
template <typename acc_t>
inline void add_relu(const acc_t* src, int64_t lo, int64_t hi, acc_t* dst) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec zero(acc_t(0));
  int64_t c = lo;
  for (; c + Vec::size() <= hi; c += Vec::size())
    (Vec::loadu(dst + c) + at::vec::clamp_min(Vec::loadu(src + c), zero)).store(dst + c);
  for (; c < hi; ++c) dst[c] += std::max(src[c], acc_t(0));
}

// F tile of query rows r0.. and key columns c0..: F[r][c] = poff[c] + sum_{r' < r} S[r'][c],
// with S = relu(A) on 1 <= j < i. `a` holds the scaled selection logits of the tile; `run` is
// cols elements of scratch.
template <typename acc_t>
inline void selection_f_tile(const acc_t* a, int64_t lda, const fsum_t* poff, int64_t r0,
                             int64_t c0, int64_t rows, int64_t cols, acc_t* f, int64_t ldf,
                             acc_t* run) {
  for (int64_t c = 0; c < cols; ++c) run[c] = static_cast<acc_t>(poff[c]);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(f + r * ldf, run, sizeof(acc_t) * cols);
    int64_t lo, hi;
    selection_cols(r0 + r, c0, cols, &lo, &hi);
    add_relu(a + r * lda, lo, hi, run);
  }
}

}  // namespace selattn::cpu
