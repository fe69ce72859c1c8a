// The operator library `selattn`: schemas, argument checks, output allocation and dispatch to
// the CPU kernels (csrc/cpu) or the CUDA launchers (csrc/cuda). The same function serves both
// dispatch keys; only the final call differs. Python wrappers live in selattn_ext/.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/decode_cpu.h"
#include "cpu/prefill_cpu.h"
#include "decode_params.h"
#include "prefill_params.h"

#ifdef SELATTN_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/decode/launch.h"
#include "cuda/prefill/launch.h"
#endif

namespace selattn {
namespace {

using at::Tensor;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK_TYPE(false, "selattn: unsupported dtype ", t);
  }
}

at::ScalarType stats_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_floating(const char* name, const Tensor& t) {
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                   "selattn: ", name, " must be float32, float64, bfloat16 or float16, got ", st);
}

void check_shape(const char* name, const Tensor& t, at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "selattn: ", name, " must have shape ", layout, " = ",
                    expected, ", got ", t.sizes());
}

void check_last_dim_contiguous(const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "selattn: ", name,
                    " must be contiguous in its last (head_dim) dimension, got strides ",
                    t.strides());
}

// t must share q's dtype and device: every kernel takes one element type on one device.
void check_like_q(const char* name, const Tensor& t, const Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "selattn: ", name,
                   " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "selattn: ", name, " must be on the device of q (",
                    q.device(), "), got ", t.device());
}

void check_heads(int64_t Hq, int64_t Hkv) {
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "selattn: the number of query heads (q.size(1) = ",
                    Hq, ") must be a multiple of the number of kv heads (k.size(1) = ", Hkv, ")");
}

// The device half of the argument checks, shared by every op: a CPU tensor needs a CPU that
// runs the kernels as compiled; a CUDA tensor needs a build with CUDA kernels.
void check_cpu_kernels_runnable(const Tensor& q) {
  TORCH_CHECK_VALUE(q.is_cpu(), "selattn: q must be a CPU or CUDA tensor, got ", q.device());
#if defined(SELATTN_CPU_AVX2) && (defined(__x86_64__) || defined(_M_X64))
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
              "selattn: the CPU kernels were built for AVX2+FMA, which this CPU lacks");
#endif
}

[[maybe_unused]] void fail_no_cuda_build() {
  TORCH_CHECK(false, "selattn: this build of selattn_ext has no CUDA kernels (built CPU only)");
}

// The layout-independent halves of the prefill checks, shared by the dense and varlen ops:
// one floating dtype and device for all inputs ...
void check_dtypes_like_q(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_sel,
                         const Tensor& k_sel) {
  check_floating("q", q);
  for (auto [name, t] : {std::pair<const char*, const Tensor&>{"k", k}, {"v", v},
                         {"q_sel", q_sel}, {"k_sel", k_sel}}) {
    check_floating(name, t);
    check_like_q(name, t, q);
  }
}

// ... and (after the shapes) contiguous head dims, a usable scale and a supported head dim.
void check_layout_scale_head_dim(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& q_sel, const Tensor& k_sel, double scale,
                                 int64_t D) {
  for (auto [name, t] : {std::pair<const char*, const Tensor&>{"q", q}, {"k", k}, {"v", v},
                         {"q_sel", q_sel}, {"k_sel", k_sel}})
    check_last_dim_contiguous(name, t);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "selattn: scale must be a positive finite",
                    " number, got ", scale);
  TORCH_CHECK_VALUE(D >= 1 && D <= 256, "selattn: head_dim (q.size(-1)) must be in [1, 256], got ",
                    D);
}

// Checks shared by the forward and the backward. Returns (B, Hq, Hkv, N, D).
std::array<int64_t, 5> check_prefill_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& q_sel, const Tensor& k_sel,
                                            double scale) {
  TORCH_CHECK_VALUE(q.dim() == 4, "selattn: q must be 4-D (B, Hq, N, D), got ", q.dim(), "-D");
  TORCH_CHECK_VALUE(k.dim() == 4, "selattn: k must be 4-D (B, Hkv, N, D), got ", k.dim(), "-D");
  TORCH_CHECK_VALUE(v.dim() == 4, "selattn: v must be 4-D (B, Hkv, N, D), got ", v.dim(), "-D");
  TORCH_CHECK_VALUE(q_sel.dim() == 3, "selattn: q_sel must be 3-D (B, N, D), got ", q_sel.dim(),
                    "-D");
  TORCH_CHECK_VALUE(k_sel.dim() == 3, "selattn: k_sel must be 3-D (B, N, D), got ", k_sel.dim(),
                    "-D");
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1);
  check_dtypes_like_q(q, k, v, q_sel, k_sel);
  check_heads(Hq, Hkv);
  check_shape("k", k, {B, Hkv, N, D}, "(B, Hkv, N, D)");
  check_shape("v", v, {B, Hkv, N, D}, "(B, Hkv, N, D)");
  check_shape("q_sel", q_sel, {B, N, D}, "(B, N, D)");
  check_shape("k_sel", k_sel, {B, N, D}, "(B, N, D)");
  check_layout_scale_head_dim(q, k, v, q_sel, k_sel, scale, D);
  if (q.is_cuda()) {
#ifdef SELATTN_WITH_CUDA
    TORCH_CHECK_VALUE(cuda::prefill_supported(to_dtype(q.scalar_type()), D),
                      "selattn: no CUDA kernel for head_dim ", D, " with dtype ",
                      q.scalar_type(), "");
    TORCH_CHECK_VALUE(cuda::prefill_grid_fits(B, Hq, N),
                      "selattn: CUDA prefill supports batch and head counts up to 65535 and N up "
                      "to ", cuda::prefill_max_seqlen(), ", got B = ", B, ", Hq = ", Hq,
                      ", N = ", N);
#else
    fail_no_cuda_build();
#endif
  } else {
    check_cpu_kernels_runnable(q);
  }
  return {B, Hq, Hkv, N, D};
}

// One helper per layout, so every tensor's strides land in the params the same way.
template <typename T>
void set4(const Tensor& t, T*& ptr, int64_t& sb, int64_t& sh, int64_t& sr) {
  ptr = static_cast<T*>(t.data_ptr());
  sb = t.stride(0), sh = t.stride(1), sr = t.stride(2);
}
template <typename T>
void set3(const Tensor& t, T*& ptr, int64_t& sb, int64_t& sr) {
  ptr = static_cast<T*>(t.data_ptr());
  sb = t.stride(0), sr = t.stride(1);
}

PrefillParams make_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_sel,
                          const Tensor& k_sel, const Tensor& out, const Tensor& lse,
                          double scale) {
  PrefillParams p{};
  p.dtype = to_dtype(q.scalar_type());
  p.batch = q.size(0), p.heads_q = q.size(1), p.heads_kv = k.size(1);
  p.seqlen = q.size(2), p.head_dim = q.size(3), p.scale = scale;
  set4(q, p.q, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  set4(k, p.k, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
  set4(v, p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  set3(q_sel, p.q_sel, p.q_sel_batch_stride, p.q_sel_row_stride);
  set3(k_sel, p.k_sel, p.k_sel_batch_stride, p.k_sel_row_stride);
  set4(out, p.out, p.out_batch_stride, p.out_head_stride, p.out_row_stride);
  p.lse = lse.data_ptr();
  return p;
}

// mem_tau of the auxiliary memory loss: absent, or a positive finite clip level.
void check_mem_tau(const std::optional<double>& mem_tau, const Tensor& q) {
  if (!mem_tau.has_value()) return;
  TORCH_CHECK_VALUE(std::isfinite(*mem_tau) && *mem_tau > 0,
                    "selattn: mem_tau (memory_tau) must be a positive finite number, got ",
                    *mem_tau);
  TORCH_CHECK_VALUE(q.size(1) > 0 || q.size(0) * q.size(2) == 0,
                    "selattn: mem_tau needs at least one query head (q.size(1) = 0)");
}

#ifdef SELATTN_WITH_CUDA
// Allocates the launcher's scratch from torch's caching allocator; the tensor must outlive the
// launch, which it does because the caller holds it until after the enqueue (the allocator is
// stream-ordered).
Tensor cuda_workspace(PrefillParams& p, size_t bytes, const Tensor& like) {
  Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                        like.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  p.workspace_bytes = bytes;
  return ws;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "selattn: CUDA ", what, " failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace

// mem: R[b, i] = sum_{j <= i} min(F[b, i, j], mem_tau) as (B, N) in lse's dtype when mem_tau is
// given, else an empty (0,) tensor (the schema needs a fixed number of outputs).
std::tuple<Tensor, Tensor, Tensor> prefill_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const Tensor& q_sel, const Tensor& k_sel,
                                               double scale, std::optional<double> mem_tau) {
  auto [B, Hq, Hkv, N, D] = check_prefill_inputs(q, k, v, q_sel, k_sel, scale);
  check_mem_tau(mem_tau, q);
  // Same strides as q when q is dense (a (B, N, H, D) view gives a (B, N, H, D) output),
  // contiguous otherwise; selattn_ext/ops.py's fake mirrors this with torch.empty_like.
  Tensor out = at::empty_like(q);
  const auto stats = q.options().dtype(stats_dtype(q.scalar_type()));
  Tensor lse = at::empty({B, Hq, N}, stats);
  Tensor mem = mem_tau.has_value() ? at::empty({B, N}, stats) : at::empty({0}, stats);
  if (out.numel() == 0) return {out, lse, mem};
  PrefillParams p = make_params(q, k, v, q_sel, k_sel, out, lse, scale);
  if (mem_tau.has_value()) p.mem_tau = *mem_tau, p.mem = mem.data_ptr();
  if (q.is_cuda()) {
#ifdef SELATTN_WITH_CUDA
    c10::cuda::CUDAGuard guard(q.device());
    Tensor ws = cuda_workspace(p, cuda::prefill_fwd_workspace_bytes(p), q);
    check_launch(cuda::prefill_fwd(p, c10::cuda::getCurrentCUDAStream().stream()),
                 "prefill_fwd");
#endif
  } else {
    cpu::prefill_fwd(p);
  }
  return {out, lse, mem};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prefill_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_sel,
    const Tensor& k_sel, const Tensor& out, const Tensor& lse, const std::optional<Tensor>& dlse,
    double scale, const std::optional<Tensor>& dmem, std::optional<double> mem_tau) {
  auto [B, Hq, Hkv, N, D] = check_prefill_inputs(q, k, v, q_sel, k_sel, scale);
  check_mem_tau(mem_tau, q);
  for (auto [name, t] : {std::pair<const char*, const Tensor&>{"dout", dout}, {"out", out}}) {
    check_like_q(name, t, q);
    check_shape(name, t, q.sizes(), "(B, Hq, N, D)");
    check_last_dim_contiguous(name, t);
  }
  const auto sdt = stats_dtype(q.scalar_type());
  TORCH_CHECK_TYPE(lse.scalar_type() == sdt, "selattn: lse must be ", sdt, ", got ",
                   lse.scalar_type());
  check_shape("lse", lse, {B, Hq, N}, "(B, Hq, N)");
  TORCH_CHECK_VALUE(lse.device() == q.device(), "selattn: lse must be on the device of q");
  Tensor lse_c = lse.contiguous();
  Tensor dlse_c;
  if (dlse.has_value() && dlse->defined()) {
    TORCH_CHECK_TYPE(dlse->scalar_type() == sdt, "selattn: dlse must be ", sdt, ", got ",
                     dlse->scalar_type());
    check_shape("dlse", *dlse, {B, Hq, N}, "(B, Hq, N)");
    TORCH_CHECK_VALUE(dlse->device() == q.device(), "selattn: dlse must be on the device of q");
    dlse_c = dlse->contiguous();
  }
  Tensor dmem_c;
  if (dmem.has_value() && dmem->defined()) {
    TORCH_CHECK_VALUE(mem_tau.has_value(), "selattn: dmem needs the mem_tau of the forward");
    TORCH_CHECK_TYPE(dmem->scalar_type() == sdt, "selattn: dmem must be ", sdt, ", got ",
                     dmem->scalar_type());
    check_shape("dmem", *dmem, {B, N}, "(B, N)");
    TORCH_CHECK_VALUE(dmem->device() == q.device(), "selattn: dmem must be on the device of q");
    dmem_c = dmem->contiguous();
  }

  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  Tensor dq_sel = at::empty_like(q_sel), dk_sel = at::empty_like(k_sel);
  if (dq.numel() == 0) return {dq, dk, dv, dq_sel, dk_sel};

  PrefillParams p = make_params(q, k, v, q_sel, k_sel, out, lse_c, scale);
  set4(dout, p.dout, p.dout_batch_stride, p.dout_head_stride, p.dout_row_stride);
  p.dlse = dlse_c.defined() ? dlse_c.data_ptr() : nullptr;
  if (dmem_c.defined()) p.mem_tau = *mem_tau, p.dmem = dmem_c.data_ptr();
  set4(dq, p.dq, p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride);
  set4(dk, p.dk, p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride);
  set4(dv, p.dv, p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride);
  set3(dq_sel, p.dq_sel, p.dq_sel_batch_stride, p.dq_sel_row_stride);
  set3(dk_sel, p.dk_sel, p.dk_sel_batch_stride, p.dk_sel_row_stride);
  if (q.is_cuda()) {
#ifdef SELATTN_WITH_CUDA
    c10::cuda::CUDAGuard guard(q.device());
    Tensor ws = cuda_workspace(p, cuda::prefill_bwd_workspace_bytes(p), q);
    check_launch(cuda::prefill_bwd(p, c10::cuda::getCurrentCUDAStream().stream()),
                 "prefill_bwd");
#endif
  } else {
    cpu::prefill_bwd(p);
  }
  return {dq, dk, dv, dq_sel, dk_sel};
}

// ============================================================================================
// decode: one step of the pruned KV cache (DESIGN §3). Python side: selattn_ext/cache.py.
// ============================================================================================
namespace {

// True when every row of t starts on a 16-byte boundary (what the CUDA kernels load).
bool aligned16(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && (t.stride(d) * t.element_size()) % 16 != 0) return false;
  return true;
}

void check_state(const char* name, const Tensor& t, at::ScalarType dtype,
                 at::IntArrayRef expected, const char* layout, const Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "selattn: ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  check_shape(name, t, expected, layout);
  TORCH_CHECK_VALUE(t.device() == q.device(), "selattn: ", name, " must be on the device of q (",
                    q.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), "selattn: ", name, " must be contiguous");
}

// Validates everything that can be validated without reading device memory, plus `lengths`
// (read back from the GPU when there: a bad length would otherwise be a silent clamp).
void check_decode_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                         const Tensor& k_cache, const Tensor& v_cache, const Tensor& f,
                         const Tensor& pos, const Tensor& seq_len,
                         const std::optional<Tensor>& lengths, double scale, int64_t sel_head,
                         int64_t budget, std::optional<double> tau) {
  TORCH_CHECK_VALUE(q.dim() == 4, "selattn: q must be 4-D (B, Hq, c, D), got ", q.dim(), "-D");
  TORCH_CHECK_VALUE(k.dim() == 4, "selattn: k must be 4-D (B, Hkv, c, D), got ", k.dim(), "-D");
  TORCH_CHECK_VALUE(v.dim() == 4, "selattn: v must be 4-D (B, Hkv, c, D), got ", v.dim(), "-D");
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "selattn: k_cache must be 4-D (B, Hkv, slots, D), got ",
                    k_cache.dim(), "-D");
  TORCH_CHECK_VALUE(f.dim() == 2, "selattn: f must be 2-D (B, slots), got ", f.dim(), "-D");
  const int64_t B = q.size(0), Hq = q.size(1), c = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), slots = k_cache.size(2);
  check_floating("q", q);
  for (auto [name, t] : {std::pair<const char*, const Tensor&>{"k", k}, {"v", v},
                         {"k_cache", k_cache}, {"v_cache", v_cache}}) {
    check_like_q(name, t, q);
  }
  check_heads(Hq, Hkv);
  check_shape("k", k, {B, Hkv, c, D}, "(B, Hkv, c, D)");
  check_shape("v", v, {B, Hkv, c, D}, "(B, Hkv, c, D)");
  check_shape("k_cache", k_cache, {B, Hkv, slots, D}, "(B, Hkv, slots, D)");
  check_shape("v_cache", v_cache, {B, Hkv, slots, D}, "(B, Hkv, slots, D)");
  for (auto [name, t] : {std::pair<const char*, const Tensor&>{"q", q}, {"k", k}, {"v", v},
                         {"k_cache", k_cache}, {"v_cache", v_cache}})
    check_last_dim_contiguous(name, t);
  check_state("f", f, stats_dtype(q.scalar_type()), {B, slots}, "(B, slots)", q);
  check_state("pos", pos, at::kLong, {B, slots}, "(B, slots)", q);
  check_state("seq_len", seq_len, at::kLong, {B}, "(B,)", q);
  TORCH_CHECK_VALUE(budget >= 1, "selattn: budget must be >= 1, got ", budget);
  TORCH_CHECK_VALUE(c >= 1, "selattn: the chunk (q.size(2)) must hold at least one token");
  TORCH_CHECK_VALUE(c <= slots - budget, "selattn: the chunk (q.size(2) = ", c,
                    ") must be <= slots - budget = ", slots, " - ", budget, " = ", slots - budget);
  TORCH_CHECK_VALUE(sel_head >= 0 && sel_head < Hq, "selattn: sel_head must be in [0, ", Hq,
                    "), got ", sel_head);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "selattn: scale must be a positive finite",
                    " number, got ", scale);
  TORCH_CHECK_VALUE(!tau.has_value() || !std::isnan(*tau), "selattn: tau must not be NaN");
  TORCH_CHECK_VALUE(D >= 1 && D <= 256, "selattn: head_dim (q.size(-1)) must be in [1, 256], got ",
                    D);
  if (lengths.has_value() && lengths->defined()) {
    check_state("lengths", *lengths, at::kLong, {B}, "(B,)", q);
    // Values are checked only where that needs no device-to-host copy: a step must stay free
    // of host syncs (CUDA-graph capture). On CUDA the kernels clamp lengths to [0, c].
    if (B > 0 && lengths->is_cpu()) {
      auto [lo, hi] = at::aminmax(*lengths);
      const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
      TORCH_CHECK_VALUE(lo_v >= 0 && hi_v <= c, "selattn: lengths must be in [0, ", c,
                        "] (the chunk size), got values in [", lo_v, ", ", hi_v, "]");
    }
  }
  if (q.is_cuda()) {
#ifdef SELATTN_WITH_CUDA
    TORCH_CHECK_VALUE(B <= 65535, "selattn: CUDA decode supports batch sizes up to 65535, got ",
                      B);
    for (auto [name, t] : {std::pair<const char*, const Tensor&>{"k_cache", k_cache},
                           {"v_cache", v_cache}})
      TORCH_CHECK_VALUE(aligned16(t), "selattn: ", name, " rows must be 16-byte aligned (use ",
                        "the tensors of a SelectiveKVCache)");
    TORCH_CHECK_VALUE(cuda::decode_supported(to_dtype(q.scalar_type()), D),
                      "selattn: no CUDA decode kernel for head_dim ", D, " with dtype ",
                      q.scalar_type(), " (CUDA decode supports head_dim 32, 64, 96, 128, 256)");
#else
    fail_no_cuda_build();
#endif
  } else {
    check_cpu_kernels_runnable(q);
  }
}

DecodeParams make_decode_params(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& k_cache, const Tensor& v_cache, const Tensor& f,
                                const Tensor& pos, const Tensor& seq_len, const Tensor& lengths,
                                const Tensor& out, double scale, int64_t sel_head,
                                int64_t budget, std::optional<double> tau) {
  DecodeParams p{};
  p.dtype = to_dtype(q.scalar_type());
  p.batch = q.size(0), p.heads_q = q.size(1), p.heads_kv = k.size(1);
  p.chunk = q.size(2), p.head_dim = q.size(3), p.slots = k_cache.size(2);
  p.budget = budget, p.sel_head = sel_head, p.scale = scale;
  p.has_tau = tau.has_value(), p.tau = tau.value_or(0.0);
  set4(q, p.q, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  set4(k, p.k_new, p.k_new_batch_stride, p.k_new_head_stride, p.k_new_row_stride);
  set4(v, p.v_new, p.v_new_batch_stride, p.v_new_head_stride, p.v_new_row_stride);
  set4(k_cache, p.k_cache, p.k_cache_batch_stride, p.k_cache_head_stride, p.k_cache_row_stride);
  set4(v_cache, p.v_cache, p.v_cache_batch_stride, p.v_cache_head_stride, p.v_cache_row_stride);
  set4(out, p.out, p.out_batch_stride, p.out_head_stride, p.out_row_stride);
  p.f = f.data_ptr();
  p.pos = pos.data_ptr<int64_t>();
  p.seq_len = seq_len.data_ptr<int64_t>();
  p.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  return p;
}

#ifdef SELATTN_WITH_CUDA
// Multiprocessors of a CUDA device, queried once per device and cached: a decode step makes
// no device query (it must stay CUDA-graph capturable and cheap on the host).
int sm_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cached{};  // 0: not yet
  TORCH_CHECK_VALUE(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS,
                    "selattn: bad CUDA device index ", static_cast<int>(device));
  int sms = cached[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cached[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}
#endif

}  // namespace

Tensor decode_step(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_cache,
                   const Tensor& v_cache, const Tensor& f, const Tensor& pos,
                   const Tensor& seq_len, const std::optional<Tensor>& lengths, double scale,
                   int64_t sel_head, int64_t budget, std::optional<double> tau,
                   const std::optional<Tensor>& workspace) {
  check_decode_inputs(q, k, v, k_cache, v_cache, f, pos, seq_len, lengths, scale, sel_head,
                      budget, tau);
  Tensor out = at::empty(q.sizes(), q.options());
  if (q.size(0) == 0 || q.size(1) == 0 || q.size(3) == 0) return out.zero_();
  Tensor lengths_t = lengths.has_value() ? *lengths : Tensor();
  DecodeParams p = make_decode_params(q, k, v, k_cache, v_cache, f, pos, seq_len, lengths_t, out,
                                      scale, sel_head, budget, tau);
  if (q.is_cuda()) {
#ifdef SELATTN_WITH_CUDA
    c10::cuda::CUDAGuard guard(q.device());
    // The kernels read rows as 16-byte vectors: re-lay out new-token inputs that are not
    // aligned that way (rare views); the cache tensors are ours and always are.
    // clone, not contiguous(): a contiguous tensor at an odd storage offset would come back
    // as itself, still misaligned.
    Tensor q_a = aligned16(q) ? q : q.clone(at::MemoryFormat::Contiguous);
    Tensor k_a = aligned16(k) ? k : k.clone(at::MemoryFormat::Contiguous);
    Tensor v_a = aligned16(v) ? v : v.clone(at::MemoryFormat::Contiguous);
    p = make_decode_params(q_a, k_a, v_a, k_cache, v_cache, f, pos, seq_len, lengths_t, out,
                           scale, sel_head, budget, tau);
    p.num_sms = sm_count(q.device().index());
    const size_t bytes = cuda::decode_workspace_bytes(p);
    Tensor ws;
    if (workspace.has_value() && workspace->defined()) {
      // The cache's own scratch, reused every step: no allocation in the step.
      ws = *workspace;
      TORCH_CHECK_TYPE(ws.scalar_type() == at::kByte, "selattn: workspace must be uint8, got ",
                       ws.scalar_type());
      TORCH_CHECK_VALUE(ws.device() == q.device() && ws.is_contiguous(),
                        "selattn: workspace must be a contiguous tensor on ", q.device());
      TORCH_CHECK_VALUE(static_cast<size_t>(ws.numel()) >= bytes, "selattn: workspace holds ",
                        ws.numel(), " bytes, this step needs ", bytes,
                        " (size it with decode_cuda_workspace_bytes)");
    } else {
      ws = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                     q.options().dtype(at::kByte));
    }
    p.workspace = ws.data_ptr();
    p.workspace_bytes = static_cast<size_t>(ws.numel());
    check_launch(cuda::decode_step(p, c10::cuda::getCurrentCUDAStream().stream()),
                 "decode_step");
#endif
  } else {
    cpu::decode_step(p);
  }
  return out;
}
// Peak scratch bytes of one CPU decode step for a cache of these sizes at the current torch
// thread count (SelectiveKVCache.memory_bytes adds it to the cache tensors).
int64_t decode_cpu_workspace_bytes(int64_t batch, int64_t heads_kv, int64_t chunk,
                                   int64_t head_dim, int64_t slots, at::ScalarType dtype) {
  for (auto [name, value] : {std::pair<const char*, int64_t>{"batch", batch}, {"heads_kv", heads_kv},
                             {"chunk", chunk}, {"head_dim", head_dim}, {"slots", slots}})
    TORCH_CHECK_VALUE(value >= 0, "selattn: ", name, " must be >= 0, got ", value);
  return static_cast<int64_t>(cpu::decode_workspace_bytes(batch, heads_kv, chunk, head_dim, slots,
                                                          to_dtype(dtype), at::get_num_threads()));
}
// Bytes of the CUDA step workspace for chunks of up to max_chunk tokens with heads_q query
// heads on `device` (SelectiveKVCache allocates it once and passes it to every step).
int64_t decode_cuda_workspace_bytes(int64_t batch, int64_t heads_q, int64_t heads_kv,
                                    int64_t max_chunk, int64_t head_dim, int64_t slots,
                                    at::ScalarType dtype, at::Device device) {
  for (auto [name, value] : {std::pair<const char*, int64_t>{"batch", batch}, {"heads_q", heads_q},
                             {"heads_kv", heads_kv}, {"max_chunk", max_chunk},
                             {"head_dim", head_dim}, {"slots", slots}})
    TORCH_CHECK_VALUE(value >= 0, "selattn: ", name, " must be >= 0, got ", value);
  TORCH_CHECK_VALUE(device.is_cuda(), "selattn: decode_cuda_workspace_bytes needs a CUDA device, ",
                    "got ", device);
#ifdef SELATTN_WITH_CUDA
  DecodeParams p{};
  p.dtype = to_dtype(dtype);
  p.batch = batch, p.heads_q = heads_q, p.heads_kv = heads_kv, p.head_dim = head_dim;
  p.slots = slots;
  p.num_sms = sm_count(device.has_index() ? device.index() : c10::cuda::current_device());
  size_t most = 0;  // the split plan depends on the chunk: the largest over 1..max_chunk
  for (int64_t c = 1; c <= max_chunk; ++c) {
    p.chunk = c;
    most = std::max(most, cuda::decode_workspace_bytes(p));
  }
  return static_cast<int64_t>(most);
#else
  fail_no_cuda_build();
  return 0;
#endif
}
// ============================================================================================
// end of decode
// ============================================================================================

// ============================================================================================
// prefill_varlen: packed ragged batches (DESIGN §1.1). q (total, Hq, D), k/v (total, Hkv, D),
// q_sel/k_sel (total, D), cu_seqlens int32 (B+1,). CUDA: one launch of the dense kernels in
// their varlen mode (PrefillParams::cu_seqlens; grids sized by the longest sequence, CTAs past
// a sequence's end exit), writing lse (Hq, total) directly. Each sequence is an independent
// prefill, so the CPU path runs the dense kernels once per sequence, their params pointing at the
// sequence's rows of the packed tensors (a strided (1, H, n, D) sequence): no copy of q/k/v/
// out, no N x N. Long sequences run one after another, each spread over the threads; short
// ones run one per thread (run_sequences). lse is (Hq, total) as in FlashAttention's
// varlen API; the kernels want it (B, Hq, N)-contiguous, so it goes through one O(Hq * total)
// packed scratch where sequence b occupies [Hq * cu[b], Hq * cu[b+1]) as (Hq, n_b).
// ============================================================================================
namespace {

// Validates cu_seqlens (read once, on the host) and returns it as host int64 offsets. On CUDA
// that is one small device-to-host copy (B + 1 ints) that waits for the stream, per call:
// acceptable for a prefill, and it buys clear errors for bad offsets (a kernel would read out
// of bounds) and the grid size from the real longest sequence.
std::vector<int64_t> check_cu_seqlens(const Tensor& cu_seqlens, int64_t max_seqlen,
                                      int64_t total, const Tensor& q) {
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt,
                   "selattn: cu_seqlens must be int32 (as in flash_attn_varlen_func), got ",
                   cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.device() == q.device(), "selattn: cu_seqlens must be on the ",
                    "device of q (", q.device(), "), got ", cu_seqlens.device());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
                    "selattn: cu_seqlens must be 1-D (B + 1,) with at least one entry, got shape ",
                    cu_seqlens.sizes());
  TORCH_CHECK_VALUE(max_seqlen >= 0, "selattn: max_seqlen must be >= 0, got ", max_seqlen);
  const Tensor cu = cu_seqlens.to(at::kCPU).contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0);
  TORCH_CHECK_VALUE(c[0] == 0, "selattn: cu_seqlens must start at 0, got cu_seqlens[0] = ", c[0]);
  std::vector<int64_t> offsets(n);
  int64_t longest = 0;
  for (int64_t b = 0; b < n; ++b) {
    offsets[b] = c[b];
    if (b == 0) continue;
    TORCH_CHECK_VALUE(c[b] >= c[b - 1], "selattn: cu_seqlens must be non-decreasing, got ",
                      "cu_seqlens[", b - 1, "] = ", c[b - 1], " > cu_seqlens[", b, "] = ", c[b]);
    longest = std::max<int64_t>(longest, c[b] - c[b - 1]);
  }
  TORCH_CHECK_VALUE(offsets.back() == total, "selattn: cu_seqlens[-1] = ", offsets.back(),
                    " must equal the total number of tokens (q.size(0) = ", total, ")");
  TORCH_CHECK_VALUE(longest <= max_seqlen, "selattn: max_seqlen = ", max_seqlen,
                    " is smaller than the longest sequence in cu_seqlens (", longest, ")");
  return offsets;
}

[[maybe_unused]] int64_t longest_sequence(const std::vector<int64_t>& offsets) {
  int64_t longest = 0;
  for (size_t b = 1; b < offsets.size(); ++b)
    longest = std::max(longest, offsets[b] - offsets[b - 1]);
  return longest;
}

// Checks shared by the varlen forward and backward; returns the host offsets.
std::vector<int64_t> check_varlen_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& q_sel, const Tensor& k_sel,
                                         const Tensor& cu_seqlens, int64_t max_seqlen,
                                         double scale) {
  TORCH_CHECK_VALUE(q.dim() == 3, "selattn: q must be 3-D (total, Hq, D), got ", q.dim(), "-D");
  TORCH_CHECK_VALUE(k.dim() == 3, "selattn: k must be 3-D (total, Hkv, D), got ", k.dim(), "-D");
  TORCH_CHECK_VALUE(v.dim() == 3, "selattn: v must be 3-D (total, Hkv, D), got ", v.dim(), "-D");
  TORCH_CHECK_VALUE(q_sel.dim() == 2, "selattn: q_sel must be 2-D (total, D), got ", q_sel.dim(),
                    "-D");
  TORCH_CHECK_VALUE(k_sel.dim() == 2, "selattn: k_sel must be 2-D (total, D), got ", k_sel.dim(),
                    "-D");
  const int64_t total = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  check_dtypes_like_q(q, k, v, q_sel, k_sel);
  check_heads(Hq, Hkv);
  check_shape("k", k, {total, Hkv, D}, "(total, Hkv, D)");
  check_shape("v", v, {total, Hkv, D}, "(total, Hkv, D)");
  check_shape("q_sel", q_sel, {total, D}, "(total, D)");
  check_shape("k_sel", k_sel, {total, D}, "(total, D)");
  check_layout_scale_head_dim(q, k, v, q_sel, k_sel, scale, D);
  if (!q.is_cuda()) check_cpu_kernels_runnable(q);
  auto offsets = check_cu_seqlens(cu_seqlens, max_seqlen, total, q);
  if (q.is_cuda()) {
#ifdef SELATTN_WITH_CUDA
    const int64_t longest = longest_sequence(offsets);
    const int64_t B = static_cast<int64_t>(offsets.size()) - 1;
    TORCH_CHECK_VALUE(cuda::prefill_supported(to_dtype(q.scalar_type()), D),
                      "selattn: no CUDA kernel for head_dim ", D, " with dtype ",
                      q.scalar_type(), "");
    TORCH_CHECK_VALUE(cuda::prefill_grid_fits(B, Hq, longest),
                      "selattn: CUDA attention_varlen supports up to 65535 sequences and heads "
                      "and sequences up to ", cuda::prefill_max_seqlen(), " tokens, got ", B,
                      " sequences, Hq = ", Hq, ", longest = ", longest);
#else
    fail_no_cuda_build();
#endif
  }
  return offsets;
}

#ifdef SELATTN_WITH_CUDA
// The CUDA kernels' varlen mode (PrefillParams::cu_seqlens): `base` describes the packed
// tensors as one (1, H, total, D) sequence; this makes it B sequences of the longest length,
// with every batch stride 0 so only the per-sequence row offsets move the pointers.
void set_varlen(PrefillParams& p, const std::vector<int64_t>& offsets, const Tensor& cu_dev) {
  p.total_rows = p.seqlen;
  p.batch = static_cast<int64_t>(offsets.size()) - 1;
  p.seqlen = longest_sequence(offsets);  // max_seqlen may be larger: size by the real one
  p.cu_seqlens = cu_dev.data_ptr<int32_t>();
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.out_batch_stride = 0;
  p.q_sel_batch_stride = p.k_sel_batch_stride = p.dout_batch_stride = 0;
  p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = 0;
  p.dq_sel_batch_stride = p.dk_sel_batch_stride = 0;
}
#endif

// Sequences up to this length fit in one or two query tiles, too little work to spread one
// over the threads: they run one per thread instead (see run_sequences).
constexpr int64_t kShortSequence = 256;

// The packed tensors as one (1, H, total, D) sequence: per-sequence params are this with the
// pointers moved to the sequence's first row and seqlen set (seq_params), no tensor views.
Tensor as_seq4(const Tensor& t) { return t.transpose(0, 1).unsqueeze(0); }
Tensor as_seq3(const Tensor& t) { return t.unsqueeze(0); }

template <typename T>
T* at_row(T* ptr, int64_t row, int64_t row_stride, size_t esize) {
  using Byte = std::conditional_t<std::is_const_v<T>, const char, char>;
  return ptr == nullptr ? nullptr
                        : reinterpret_cast<T*>(reinterpret_cast<Byte*>(ptr) +
                                               row * row_stride * static_cast<int64_t>(esize));
}

// Rows [start, start + n) of `base`; lse / dlse point into (Hq, n)-contiguous blocks of the
// packed scratch, mem / dmem into the (total,) vectors.
PrefillParams seq_params(const PrefillParams& base, int64_t start, int64_t n, size_t esize,
                         size_t stats_esize) {
  PrefillParams p = base;
  p.seqlen = n;
  p.q = at_row(base.q, start, base.q_row_stride, esize);
  p.k = at_row(base.k, start, base.k_row_stride, esize);
  p.v = at_row(base.v, start, base.v_row_stride, esize);
  p.q_sel = at_row(base.q_sel, start, base.q_sel_row_stride, esize);
  p.k_sel = at_row(base.k_sel, start, base.k_sel_row_stride, esize);
  p.out = at_row(base.out, start, base.out_row_stride, esize);
  p.dout = at_row(base.dout, start, base.dout_row_stride, esize);
  p.dq = at_row(base.dq, start, base.dq_row_stride, esize);
  p.dk = at_row(base.dk, start, base.dk_row_stride, esize);
  p.dv = at_row(base.dv, start, base.dv_row_stride, esize);
  p.dq_sel = at_row(base.dq_sel, start, base.dq_sel_row_stride, esize);
  p.dk_sel = at_row(base.dk_sel, start, base.dk_sel_row_stride, esize);
  p.lse = at_row(base.lse, start, base.heads_q, stats_esize);
  p.dlse = at_row(base.dlse, start, base.heads_q, stats_esize);
  p.mem = at_row(base.mem, start, 1, stats_esize);
  p.dmem = at_row(base.dmem, start, 1, stats_esize);
  return p;
}

// Copies an (H, n) row block between the (H, total) lse layout (rows of `total`, starting at
// column `start`) and a contiguous (H, n) block. Plain memory, so worker threads can run it.
void copy_lse_block(void* packed, const void* strided, int64_t H, int64_t n, int64_t total,
                    int64_t start, size_t esize, bool to_packed) {
  auto* pk = static_cast<char*>(packed);
  auto* st = static_cast<char*>(const_cast<void*>(strided));
  for (int64_t h = 0; h < H; ++h) {
    char* row = st + (h * total + start) * esize;
    char* blk = pk + h * n * esize;
    if (to_packed) std::memcpy(blk, row, n * esize);
    else std::memcpy(row, blk, n * esize);
  }
}

// Runs `job(i)` for every sequence i of `jobs_len`: long sequences one after another (each
// kernel call spreads its tiles over the threads), short ones spread over the threads one
// sequence per task (a kernel called inside a parallel region runs on the calling thread, as
// every ATen parallel_for does). `job` must touch raw memory only, no tensors.
template <typename Job>
void run_sequences(const std::vector<int64_t>& lengths, const Job& job) {
  std::vector<int64_t> short_ones;
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] > kShortSequence) job(i);
    else if (lengths[i] > 0) short_ones.push_back(static_cast<int64_t>(i));
  }
  at::parallel_for(0, static_cast<int64_t>(short_ones.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) job(static_cast<size_t>(short_ones[j]));
  });
}

}  // namespace

// mem: R[t] = sum_{j <= i} min(F[i, j], mem_tau) of token t (position i of its sequence) as
// (total,) in lse's dtype when mem_tau is given, else an empty (0,) tensor.
std::tuple<Tensor, Tensor, Tensor> prefill_varlen_fwd(const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& q_sel,
                                                      const Tensor& k_sel,
                                                      const Tensor& cu_seqlens,
                                                      int64_t max_seqlen, double scale,
                                                      std::optional<double> mem_tau) {
  const auto offsets =
      check_varlen_inputs(q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, scale);
  check_mem_tau(mem_tau, q.transpose(0, 1).unsqueeze(0));  // as (1, Hq, total, D)
  const int64_t total = q.size(0), Hq = q.size(1);
  Tensor out = at::empty_like(q);
  const auto stats = q.options().dtype(stats_dtype(q.scalar_type()));
  Tensor lse = at::empty({Hq, total}, stats);
  Tensor mem = mem_tau.has_value() ? at::empty({total}, stats) : at::empty({0}, stats);
  if (out.numel() == 0) return {out, lse, mem};
  if (q.is_cuda()) {
#ifdef SELATTN_WITH_CUDA
    const Tensor cu_dev = cu_seqlens.contiguous();
    PrefillParams p = make_params(as_seq4(q), as_seq4(k), as_seq4(v), as_seq3(q_sel),
                                  as_seq3(k_sel), as_seq4(out), lse, scale);
    if (mem_tau.has_value()) p.mem_tau = *mem_tau, p.mem = mem.data_ptr();
    set_varlen(p, offsets, cu_dev);
    c10::cuda::CUDAGuard guard(q.device());
    Tensor ws = cuda_workspace(p, cuda::prefill_fwd_workspace_bytes(p), q);
    check_launch(cuda::prefill_fwd(p, c10::cuda::getCurrentCUDAStream().stream()),
                 "prefill_varlen_fwd");
#endif
    return {out, lse, mem};
  }
  // The kernels write lse as (1, Hq, n)-contiguous: sequence b's block of this scratch is
  // [Hq * cu[b], Hq * cu[b + 1]), copied into lse's (Hq, total) rows after its kernel.
  Tensor lse_packed = at::empty({Hq * total}, stats);
  PrefillParams base = make_params(as_seq4(q), as_seq4(k), as_seq4(v), as_seq3(q_sel),
                                   as_seq3(k_sel), as_seq4(out), lse_packed, scale);
  if (mem_tau.has_value()) base.mem_tau = *mem_tau, base.mem = mem.data_ptr();
  const size_t nseq = offsets.size() - 1;
  std::vector<int64_t> lengths(nseq);
  for (size_t b = 0; b < nseq; ++b) lengths[b] = offsets[b + 1] - offsets[b];
  const size_t esize = q.element_size(), stats_esize = lse.element_size();
  run_sequences(lengths, [&](size_t b) {
    const PrefillParams p = seq_params(base, offsets[b], lengths[b], esize, stats_esize);
    cpu::prefill_fwd(p);
    copy_lse_block(p.lse, lse.data_ptr(), Hq, lengths[b], total, offsets[b], stats_esize,
                   /*to_packed=*/false);
  });
  return {out, lse, mem};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prefill_varlen_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_sel,
    const Tensor& k_sel, const Tensor& cu_seqlens, int64_t max_seqlen, const Tensor& out,
    const Tensor& lse, const std::optional<Tensor>& dlse, double scale,
    const std::optional<Tensor>& dmem, std::optional<double> mem_tau) {
  const auto offsets =
      check_varlen_inputs(q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, scale);
  check_mem_tau(mem_tau, q.transpose(0, 1).unsqueeze(0));  // as (1, Hq, total, D)
  const int64_t total = q.size(0), Hq = q.size(1);
  for (auto [name, t] : {std::pair<const char*, const Tensor&>{"dout", dout}, {"out", out}}) {
    check_like_q(name, t, q);
    check_shape(name, t, q.sizes(), "(total, Hq, D)");
    check_last_dim_contiguous(name, t);
  }
  const auto sdt = stats_dtype(q.scalar_type());
  auto check_stats = [&](const char* name, const Tensor& t, at::IntArrayRef shape,
                         const char* layout) {
    TORCH_CHECK_TYPE(t.scalar_type() == sdt, "selattn: ", name, " must be ", sdt, ", got ",
                     t.scalar_type());
    check_shape(name, t, shape, layout);
    TORCH_CHECK_VALUE(t.device() == q.device(), "selattn: ", name, " must be on the device of q");
  };
  check_stats("lse", lse, {Hq, total}, "(Hq, total)");
  const bool has_dlse = dlse.has_value() && dlse->defined();
  if (has_dlse) check_stats("dlse", *dlse, {Hq, total}, "(Hq, total)");
  Tensor dmem_c;
  if (dmem.has_value() && dmem->defined()) {
    TORCH_CHECK_VALUE(mem_tau.has_value(), "selattn: dmem needs the mem_tau of the forward");
    check_stats("dmem", *dmem, {total}, "(total,)");
    dmem_c = dmem->contiguous();
  }

  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  Tensor dq_sel = at::empty_like(q_sel), dk_sel = at::empty_like(k_sel);
  if (dq.numel() == 0) return {dq, dk, dv, dq_sel, dk_sel};
  const auto stats = q.options().dtype(sdt);
  Tensor lse_c = lse.contiguous();
  Tensor dlse_c = has_dlse ? dlse->contiguous() : Tensor();
  if (q.is_cuda()) {
#ifdef SELATTN_WITH_CUDA
    // The kernels read lse / dlse as (Hq, total) and dmem as (total,) directly.
    const Tensor cu_dev = cu_seqlens.contiguous();
    PrefillParams p = make_params(as_seq4(q), as_seq4(k), as_seq4(v), as_seq3(q_sel),
                                  as_seq3(k_sel), as_seq4(out), lse_c, scale);
    set4(as_seq4(dout), p.dout, p.dout_batch_stride, p.dout_head_stride, p.dout_row_stride);
    p.dlse = has_dlse ? dlse_c.data_ptr() : nullptr;
    if (dmem_c.defined()) p.mem_tau = *mem_tau, p.dmem = dmem_c.data_ptr();
    set4(as_seq4(dq), p.dq, p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride);
    set4(as_seq4(dk), p.dk, p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride);
    set4(as_seq4(dv), p.dv, p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride);
    set3(as_seq3(dq_sel), p.dq_sel, p.dq_sel_batch_stride, p.dq_sel_row_stride);
    set3(as_seq3(dk_sel), p.dk_sel, p.dk_sel_batch_stride, p.dk_sel_row_stride);
    set_varlen(p, offsets, cu_dev);
    c10::cuda::CUDAGuard guard(q.device());
    Tensor ws = cuda_workspace(p, cuda::prefill_bwd_workspace_bytes(p), q);
    check_launch(cuda::prefill_bwd(p, c10::cuda::getCurrentCUDAStream().stream()),
                 "prefill_varlen_bwd");
#endif
    return {dq, dk, dv, dq_sel, dk_sel};
  }
  // The kernels read lse / dlse as (1, Hq, n)-contiguous: per-sequence blocks of a scratch,
  // filled from the (Hq, total) rows by each job (O(Hq * n) copies).
  Tensor lse_packed = at::empty({Hq * total}, stats);
  Tensor dlse_packed = has_dlse ? at::empty({Hq * total}, stats) : Tensor();
  PrefillParams base = make_params(as_seq4(q), as_seq4(k), as_seq4(v), as_seq3(q_sel),
                                   as_seq3(k_sel), as_seq4(out), lse_packed, scale);
  set4(as_seq4(dout), base.dout, base.dout_batch_stride, base.dout_head_stride,
       base.dout_row_stride);
  base.dlse = has_dlse ? dlse_packed.data_ptr() : nullptr;
  if (dmem_c.defined()) base.mem_tau = *mem_tau, base.dmem = dmem_c.data_ptr();
  set4(as_seq4(dq), base.dq, base.dq_batch_stride, base.dq_head_stride, base.dq_row_stride);
  set4(as_seq4(dk), base.dk, base.dk_batch_stride, base.dk_head_stride, base.dk_row_stride);
  set4(as_seq4(dv), base.dv, base.dv_batch_stride, base.dv_head_stride, base.dv_row_stride);
  set3(as_seq3(dq_sel), base.dq_sel, base.dq_sel_batch_stride, base.dq_sel_row_stride);
  set3(as_seq3(dk_sel), base.dk_sel, base.dk_sel_batch_stride, base.dk_sel_row_stride);
  const size_t nseq = offsets.size() - 1;
  std::vector<int64_t> lengths(nseq);
  for (size_t b = 0; b < nseq; ++b) lengths[b] = offsets[b + 1] - offsets[b];
  const size_t esize = q.element_size(), stats_esize = lse_c.element_size();
  run_sequences(lengths, [&](size_t b) {
    const PrefillParams p = seq_params(base, offsets[b], lengths[b], esize, stats_esize);
    copy_lse_block(const_cast<void*>(p.lse), lse_c.data_ptr(), Hq, lengths[b], total,
                   offsets[b], stats_esize, /*to_packed=*/true);
    if (has_dlse)
      copy_lse_block(const_cast<void*>(p.dlse), dlse_c.data_ptr(), Hq, lengths[b], total,
                     offsets[b], stats_esize, /*to_packed=*/true);
    cpu::prefill_bwd(p);
  });
  // Zero-length sequences own no rows, so every row of the gradients was written above.
  return {dq, dk, dv, dq_sel, dk_sel};
}
// ============================================================================================
// end of prefill_varlen
// ============================================================================================

TORCH_LIBRARY(selattn, m) {
  m.def(
      "prefill_fwd(Tensor q, Tensor k, Tensor v, Tensor q_sel, Tensor k_sel, float scale,"
      " float? mem_tau=None) -> (Tensor out, Tensor lse, Tensor mem)");
  m.def(
      "prefill_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor q_sel, Tensor k_sel,"
      " Tensor out, Tensor lse, Tensor? dlse, float scale, Tensor? dmem=None,"
      " float? mem_tau=None) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dq_sel, Tensor dk_sel)");
  // decode (DESIGN §3): mutates the cache state, returns the chunk's attention output.
  m.def(
      "decode_step(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache,"
      " Tensor(c!) f, Tensor(d!) pos, Tensor(e!) seq_len, Tensor? lengths, float scale,"
      " int sel_head, int budget, float? tau, Tensor(f!)? workspace=None) -> Tensor");
  m.def(
      "decode_cpu_workspace_bytes(int batch, int heads_kv, int chunk, int head_dim, int slots,"
      " ScalarType dtype) -> int",
      &decode_cpu_workspace_bytes);
  m.def(
      "decode_cuda_workspace_bytes(int batch, int heads_q, int heads_kv, int max_chunk,"
      " int head_dim, int slots, ScalarType dtype, Device device) -> int",
      &decode_cuda_workspace_bytes);
  // packed ragged batches (DESIGN §1.1): q (total, Hq, D), cu_seqlens int32 (B + 1,).
  m.def(
      "prefill_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor q_sel, Tensor k_sel,"
      " Tensor cu_seqlens, int max_seqlen, float scale, float? mem_tau=None)"
      " -> (Tensor out, Tensor lse, Tensor mem)");
  m.def(
      "prefill_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor q_sel,"
      " Tensor k_sel, Tensor cu_seqlens, int max_seqlen, Tensor out, Tensor lse, Tensor? dlse,"
      " float scale, Tensor? dmem=None, float? mem_tau=None)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dq_sel, Tensor dk_sel)");
}

TORCH_LIBRARY_IMPL(selattn, CPU, m) {
  m.impl("prefill_fwd", &prefill_fwd);
  m.impl("prefill_bwd", &prefill_bwd);
  m.impl("decode_step", &decode_step);
  m.impl("prefill_varlen_fwd", &prefill_varlen_fwd);
  m.impl("prefill_varlen_bwd", &prefill_varlen_bwd);
}

// Registered in every build (CUDA is a dispatch key of any torch): a CPU-only build then says
// it was built without CUDA (check_varlen_inputs) instead of reporting a missing backend.
TORCH_LIBRARY_IMPL(selattn, CUDA, m) {
  m.impl("prefill_varlen_fwd", &prefill_varlen_fwd);
  m.impl("prefill_varlen_bwd", &prefill_varlen_bwd);
}

#ifdef SELATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(selattn, CUDA, m) {
  m.impl("prefill_fwd", &prefill_fwd);
  m.impl("prefill_bwd", &prefill_bwd);
  m.impl("decode_step", &decode_step);
}
#endif

}  // namespace selattn
