// C++-level test of the selattn::prefill_fwd / prefill_bwd ops, called through the dispatcher
// as a C++ user of libselattn would. The forward is compared with a naive loop implementation
// of DESIGN §1 in double; the backward with central finite differences of the forward; bad
// input must throw a c10 error that names the argument.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "[ OK ]" : "[FAIL]", what.c_str());
  if (!ok) ++g_failures;
}

using FwdFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&, const Tensor&, double,
                                                 std::optional<double>);
using BwdFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const std::optional<Tensor>&, double,
    const std::optional<Tensor>&, std::optional<double>);

c10::TypedOperatorHandle<FwdFn> fwd_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("selattn::prefill_fwd", "").typed<FwdFn>();
}
c10::TypedOperatorHandle<BwdFn> bwd_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("selattn::prefill_bwd", "").typed<BwdFn>();
}

// The ops without the optional memory-loss arguments: (out, lse) and the five gradients.
std::tuple<Tensor, Tensor> prefill_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& q_sel, const Tensor& k_sel, double s) {
  auto [out, lse, mem] = fwd_op().call(q, k, v, q_sel, k_sel, s, std::nullopt);
  return {out, lse};
}
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prefill_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_sel,
    const Tensor& k_sel, const Tensor& out, const Tensor& lse, const std::optional<Tensor>& dlse,
    double s) {
  return bwd_op().call(dout, q, k, v, q_sel, k_sel, out, lse, dlse, s, std::nullopt,
                       std::nullopt);
}

// DESIGN §1, literally: S, F, logits and a two-pass softmax per row, all in double.
std::tuple<Tensor, Tensor> naive_prefill(const Tensor& q_in, const Tensor& k_in,
                                         const Tensor& v_in, const Tensor& qs_in,
                                         const Tensor& ks_in, double s) {
  Tensor q = q_in.to(at::kDouble).contiguous(), k = k_in.to(at::kDouble).contiguous();
  Tensor v = v_in.to(at::kDouble).contiguous(), qs = qs_in.to(at::kDouble).contiguous();
  Tensor ks = ks_in.to(at::kDouble).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t g = Hq / k.size(1);
  auto qa = q.accessor<double, 4>(), ka = k.accessor<double, 4>(), va = v.accessor<double, 4>();
  auto qsa = qs.accessor<double, 3>(), ksa = ks.accessor<double, 3>();
  Tensor out = at::zeros({B, Hq, N, D}, at::kDouble), lse = at::zeros({B, Hq, N}, at::kDouble);
  auto oa = out.accessor<double, 4>();
  auto la = lse.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> S(N * N, 0.0), F(N * N, 0.0);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 1; j < i; ++j) {
        double a = 0;
        for (int64_t d = 0; d < D; ++d) a += qsa[b][i][d] * ksa[b][j][d];
        S[i * N + j] = std::max(0.0, s * a);
      }
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j)
        for (int64_t kk = 0; kk < i; ++kk) F[i * N + j] += S[kk * N + j];
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < N; ++i) {
        std::vector<double> logit(i + 1);
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qa[b][h][i][d] * ka[b][h / g][j][d];
          logit[j] = s * dot - F[i * N + j];
          mx = std::max(mx, logit[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(logit[j] - mx);
        for (int64_t j = 0; j <= i; ++j) {
          const double p = std::exp(logit[j] - mx) / sum;
          for (int64_t d = 0; d < D; ++d) oa[b][h][i][d] += p * va[b][h / g][j][d];
        }
        la[b][h][i] = mx + std::log(sum);
      }
  }
  return {out, lse};
}

std::string fmt(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g", x);
  return buf;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

struct Inputs {
  Tensor q, k, v, q_sel, k_sel;
};

// Random inputs with logit std ~1.7 so F matters. `transposed` stores q/k/v as (B, N, H, D) and
// passes (B, H, N, D) views; q_sel is then a view of q's head `sel_head` (row stride H * D).
Inputs make_inputs(int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t D, at::ScalarType dt,
                   bool transposed, int64_t sel_head) {
  auto opt = at::TensorOptions().dtype(dt);
  Inputs in;
  if (transposed) {
    in.q = (at::randn({B, N, Hq, D}, opt) * 1.3).transpose(1, 2);
    in.k = (at::randn({B, N, Hkv, D}, opt) * 1.3).transpose(1, 2);
    in.v = at::randn({B, N, Hkv, D}, opt).transpose(1, 2);
  } else {
    in.q = at::randn({B, Hq, N, D}, opt) * 1.3;
    in.k = at::randn({B, Hkv, N, D}, opt) * 1.3;
    in.v = at::randn({B, Hkv, N, D}, opt);
  }
  in.q_sel = in.q.select(1, sel_head);
  in.k_sel = in.k.select(1, sel_head / (Hq / Hkv));
  return in;
}

void test_forward_matches_naive(at::ScalarType dt, bool transposed, double tol) {
  const int64_t B = 2, Hq = 4, Hkv = 2, N = 37, D = 16, sh = 3;
  Inputs in = make_inputs(B, Hq, Hkv, N, D, dt, transposed, sh);
  const double s = 1.0 / std::sqrt(static_cast<double>(D));
  auto [out, lse] = prefill_fwd(in.q, in.k, in.v, in.q_sel, in.k_sel, s);
  auto [want, want_lse] = naive_prefill(in.q, in.k, in.v, in.q_sel, in.k_sel, s);
  const std::string tag = std::string(c10::toString(dt)) + (transposed ? " transposed" : "");
  const double e_out = max_abs_diff(out, want), e_lse = max_abs_diff(lse, want_lse);
  expect(out.scalar_type() == dt && out.sizes() == in.q.sizes(), "fwd output dtype/shape " + tag);
  expect(e_out <= tol, "fwd out vs naive " + tag + ": max err " + fmt(e_out));
  expect(e_lse <= tol, "fwd lse vs naive " + tag + ": max err " + fmt(e_lse));
  // F must matter for these inputs, else the comparison would not test it.
  auto [plain, plain_lse] = naive_prefill(in.q, in.k, in.v, in.q_sel * 0, in.k_sel, s);
  expect(max_abs_diff(plain, want) > 0.1, "selection changes the output " + tag);
}

// <out, dout> + <lse, dlse> as a function of the five inputs.
double loss(const Inputs& in, const Tensor& dout, const Tensor& dlse, double s) {
  auto [out, lse] = prefill_fwd(in.q, in.k, in.v, in.q_sel, in.k_sel, s);
  return ((out * dout).sum() + (lse * dlse).sum()).item<double>();
}

void test_backward_matches_finite_differences() {
  const int64_t B = 1, Hq = 2, Hkv = 1, N = 11, D = 8;
  auto opt = at::TensorOptions().dtype(at::kDouble);
  Inputs in{at::randn({B, Hq, N, D}, opt) * 1.3, at::randn({B, Hkv, N, D}, opt) * 1.3,
            at::randn({B, Hkv, N, D}, opt), at::randn({B, N, D}, opt) * 1.3,
            at::randn({B, N, D}, opt) * 1.3};
  const double s = 0.4;
  Tensor dout = at::randn({B, Hq, N, D}, opt), dlse = at::randn({B, Hq, N}, opt);
  auto [out, lse] = prefill_fwd(in.q, in.k, in.v, in.q_sel, in.k_sel, s);
  auto grads = prefill_bwd(dout, in.q, in.k, in.v, in.q_sel, in.k_sel, out, lse, dlse, s);
  std::vector<Tensor> g = {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
                           std::get<3>(grads), std::get<4>(grads)};
  const char* names[] = {"q", "k", "v", "q_sel", "k_sel"};
  std::vector<Tensor*> inputs = {&in.q, &in.k, &in.v, &in.q_sel, &in.k_sel};
  const double eps = 1e-6;
  for (size_t t = 0; t < inputs.size(); ++t) {
    Tensor dir = at::randn(inputs[t]->sizes(), opt);
    Tensor saved = *inputs[t];
    *inputs[t] = saved + eps * dir;
    const double lp = loss(in, dout, dlse, s);
    *inputs[t] = saved - eps * dir;
    const double lm = loss(in, dout, dlse, s);
    *inputs[t] = saved;
    const double fd = (lp - lm) / (2 * eps), an = (g[t] * dir).sum().item<double>();
    const double err = std::abs(fd - an) / std::max(1.0, std::abs(fd));
    expect(err < 1e-6 && std::abs(an) > 1e-3,
           std::string("bwd d") + names[t] + " directional derivative: analytic " +
               fmt(an) + ", finite difference " + fmt(fd));
  }
}

template <typename Error>
void expect_throws(const std::string& what, const std::string& must_contain,
                   const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    expect(msg.find(must_contain) != std::string::npos,
           "bad input (" + what + ") message names '" + must_contain + "'");
    return;
  } catch (const std::exception& e) {
    expect(false, "bad input (" + what + ") threw the wrong error type: " + e.what());
    return;
  }
  expect(false, "bad input (" + what + ") did not throw");
}

void test_bad_inputs() {
  Inputs in = make_inputs(1, 2, 1, 5, 8, at::kFloat, false, 0);
  expect_throws<c10::ValueError>("3-D q", "q must be 4-D", [&] {
    prefill_fwd(in.q.select(1, 0), in.k, in.v, in.q_sel, in.k_sel, 1.0);
  });
  expect_throws<c10::TypeError>("k in float64", "k must have the dtype of q", [&] {
    prefill_fwd(in.q, in.k.to(at::kDouble), in.v, in.q_sel, in.k_sel, 1.0);
  });
  expect_throws<c10::ValueError>("q_sel of the wrong length", "q_sel must have shape", [&] {
    prefill_fwd(in.q, in.k, in.v, in.q_sel.narrow(1, 0, 4), in.k_sel, 1.0);
  });
  expect_throws<c10::ValueError>("negative scale", "scale", [&] {
    prefill_fwd(in.q, in.k, in.v, in.q_sel, in.k_sel, -1.0);
  });
  expect_throws<c10::ValueError>("Hq % Hkv != 0", "multiple of the number of kv heads", [&] {
    Tensor k3 = at::randn({1, 3, 5, 8});
    prefill_fwd(at::randn({1, 4, 5, 8}), k3, k3, in.q_sel, in.k_sel, 1.0);
  });
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_bad_inputs();
  test_forward_matches_naive(at::kDouble, false, 1e-10);
  test_forward_matches_naive(at::kDouble, true, 1e-10);
  test_forward_matches_naive(at::kFloat, true, 2e-4);
  test_backward_matches_finite_differences();
  std::printf("%d failure(s)\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
