// C entry points of the CPU execution target, for tools/cuda_emulation/emulated.py (ctypes):
// the real launchers (prefill/launch.cu, decode/launch.cu) called with host pointers, and
// single-warp test kernels for each inline-PTX wrapper of arch.cuh and each shuffle, so a wrong
// fragment table is caught on its own and cannot hide behind a matching wrong kernel.
#include <cxxabi.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/arch.cuh"
#include "cuda/decode/launch.h"
#include "cuda/emulation/runtime.h"
#include "cuda/prefill/dispatch.h"
#include "cuda/prefill/launch.h"
#include "decode_params.h"
#include "prefill_params.h"

namespace {

using selattn::DType;

// Workspaces as the GPU would hand them over: uninitialised. Poisoned with 0xff bytes (NaN in
// every float format) so a kernel that reads scratch it never wrote produces NaN.
struct Poisoned {
  void* ptr = nullptr;
  explicit Poisoned(size_t bytes) {
    if (posix_memalign(&ptr, 256, bytes == 0 ? 1 : bytes) != 0) std::abort();
    std::memset(ptr, 0xff, bytes == 0 ? 1 : bytes);
  }
  ~Poisoned() { std::free(ptr); }
};

}  // namespace

// ---- single-warp wrapper tests ------------------------------------------------------------
// Named (not anonymous) so their symbols are visible: every emulated launch is recorded by name.
namespace selattn::emu::tests {

// Each lane addresses row `lane` of a 32 x 8 matrix of 16-bit elements in shared memory (row k
// of 8x8 matrix m is row 8m + k) and writes its four registers to out[lane][0..3].
__global__ void ldmatrix_test_kernel(const uint16_t* in, uint32_t* out, int trans) {
  SELATTN_SHARED(tile, uint16_t[32][8]);
  const int lane = threadIdx.x;
  for (int c = 0; c < 8; ++c) tile[lane][c] = in[lane * 8 + c];
  __syncwarp();
  uint32_t r[4];
  if (trans)
    selattn::cuda::ldmatrix_x4_trans(r, &tile[lane][0]);
  else
    selattn::cuda::ldmatrix_x4(r, &tile[lane][0]);
  for (int m = 0; m < 4; ++m) out[lane * 4 + m] = r[m];
}

// Lane l hands in frag[l] = {a0..a3, b0, b1} and c[l][0..3]; gets D back in c.
template <typename T>
__global__ void mma_test_kernel(const uint32_t* frag, float* c) {
  const int lane = threadIdx.x;
  const uint32_t a[4] = {frag[lane * 6], frag[lane * 6 + 1], frag[lane * 6 + 2], frag[lane * 6 + 3]};
  float acc[4] = {c[lane * 4], c[lane * 4 + 1], c[lane * 4 + 2], c[lane * 4 + 3]};
  selattn::cuda::mma_16816<T>(acc, a, frag[lane * 6 + 4], frag[lane * 6 + 5]);
  for (int i = 0; i < 4; ++i) c[lane * 4 + i] = acc[i];
}

// C (16 x 16) = A (16 x 16) B with the kernels' own addressing: A row-major through ldmatrix_x4,
// B either stored transposed (n x k, like K in Q K^T: ldmatrix_x4) or as is (k x n, like V in
// P V: ldmatrix_x4_trans). Every element in bf16/fp16 bits; C row-major fp32.
template <typename T>
__global__ void gemm_test_kernel(const uint16_t* a_in, const uint16_t* b_in, float* c_out,
                                 int b_is_k_by_n) {
  SELATTN_SHARED(sa, uint16_t[16][16]);
  SELATTN_SHARED(sb, uint16_t[16][16]);
  const int lane = threadIdx.x;
  for (int e = lane; e < 256; e += 32) {
    sa[e / 16][e % 16] = a_in[e];
    sb[e / 16][e % 16] = b_in[e];
  }
  __syncwarp();
  uint32_t a[4], b[4];
  selattn::cuda::ldmatrix_x4(a, &sa[(lane % 8) + 8 * ((lane / 8) % 2)][8 * (lane / 16)]);
  if (b_is_k_by_n)
    selattn::cuda::ldmatrix_x4_trans(b, &sb[(lane % 8) + 8 * ((lane / 8) % 2)][8 * (lane / 16)]);
  else
    selattn::cuda::ldmatrix_x4(b, &sb[(lane % 8) + 8 * (lane / 16)][8 * ((lane / 8) % 2)]);
  float c0[4] = {0, 0, 0, 0}, c1[4] = {0, 0, 0, 0};
  selattn::cuda::mma_16816<T>(c0, a, b[0], b[1]);
  selattn::cuda::mma_16816<T>(c1, a, b[2], b[3]);
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    c_out[row * 16 + col] = c0[i];
    c_out[row * 16 + 8 + col] = c1[i];
  }
}

// out[kind][lane] for kinds index/up/down/xor at arg and width.
__global__ void shuffle_test_kernel(int arg, int width, int* out) {
  const int lane = threadIdx.x;
  const int v = 100 + lane;
  out[0 * 32 + lane] = __shfl_sync(0xffffffffu, v, arg, width);
  out[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, unsigned(arg), width);
  out[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, unsigned(arg), width);
  out[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, arg, width);
}

// A __syncthreads inside a branch that half the block skips: must be reported, not hang.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

// Thread 0 writes a shared word that thread 33 (another warp) then reads: a race unless the
// barrier is there. For checking that the race checker sees one.
__global__ void race_test_kernel(int use_barrier, int* out) {
  SELATTN_SHARED(word, int);
  if (threadIdx.x == 0) word = 7;
  if (use_barrier) __syncthreads();
  if (threadIdx.x == 33) out[0] = word;
}

template <typename... K, typename... A>
int run_one_warp(void (*kernel)(K...), A... args) {
  return selattn::cuda::launch_kernel(kernel, dim3(1), dim3(32), 0, nullptr, args...);
}

}  // namespace selattn::emu::tests

using namespace selattn::emu::tests;

extern "C" {

// ---- prefill: the real launchers ---------------------------------------------------------
// ints: dtype, B, Hq, Hkv, N, D, then strides (batch, head, row) of q k v out dout dq dk dv
// and (batch, row) of q_sel k_sel dq_sel dk_sel. reals: scale, mem_tau (0: none).
// ptrs: q k v q_sel k_sel out lse mem dout dlse dmem dq dk dv dq_sel dk_sel (null when unused).
static int emu_prefill(int backward, const int64_t* ints, const double* reals,
                       void* const* ptrs, const int32_t* cu_seqlens, int64_t total_rows) {
  selattn::PrefillParams p{};
  p.cu_seqlens = cu_seqlens, p.total_rows = total_rows;
  int i = 0;
  p.dtype = static_cast<DType>(ints[i++]);
  p.batch = ints[i++], p.heads_q = ints[i++], p.heads_kv = ints[i++];
  p.seqlen = ints[i++], p.head_dim = ints[i++];
  auto s4 = [&](int64_t& b, int64_t& h, int64_t& r) { b = ints[i++], h = ints[i++], r = ints[i++]; };
  auto s3 = [&](int64_t& b, int64_t& r) { b = ints[i++], r = ints[i++]; };
  s4(p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  s4(p.k_batch_stride, p.k_head_stride, p.k_row_stride);
  s4(p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  s4(p.out_batch_stride, p.out_head_stride, p.out_row_stride);
  s4(p.dout_batch_stride, p.dout_head_stride, p.dout_row_stride);
  s4(p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride);
  s4(p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride);
  s4(p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride);
  s3(p.q_sel_batch_stride, p.q_sel_row_stride);
  s3(p.k_sel_batch_stride, p.k_sel_row_stride);
  s3(p.dq_sel_batch_stride, p.dq_sel_row_stride);
  s3(p.dk_sel_batch_stride, p.dk_sel_row_stride);
  p.scale = reals[0];
  p.mem_tau = reals[1];
  int k = 0;
  p.q = ptrs[k++], p.k = ptrs[k++], p.v = ptrs[k++], p.q_sel = ptrs[k++], p.k_sel = ptrs[k++];
  p.out = ptrs[k++], p.lse = ptrs[k++], p.mem = ptrs[k++];
  p.dout = ptrs[k++], p.dlse = ptrs[k++], p.dmem = ptrs[k++];
  p.dq = ptrs[k++], p.dk = ptrs[k++], p.dv = ptrs[k++], p.dq_sel = ptrs[k++], p.dk_sel = ptrs[k++];
  const size_t bytes = backward ? selattn::cuda::prefill_bwd_workspace_bytes(p)
                                : selattn::cuda::prefill_fwd_workspace_bytes(p);
  Poisoned ws(bytes);
  p.workspace = ws.ptr, p.workspace_bytes = bytes;
  return backward ? selattn::cuda::prefill_bwd(p, nullptr) : selattn::cuda::prefill_fwd(p, nullptr);
}

int selattn_emu_prefill(int backward, const int64_t* ints, const double* reals, void* const* ptrs) {
  return emu_prefill(backward, ints, reals, ptrs, nullptr, 0);
}

// Varlen (PrefillParams::cu_seqlens): the same arguments with B = the number of sequences,
// N = max_seqlen and batch strides 0, plus the (B + 1,) offsets and the packed row count.
int selattn_emu_prefill_varlen(int backward, const int64_t* ints, const double* reals,
                               void* const* ptrs, const int32_t* cu_seqlens, int64_t total_rows) {
  return emu_prefill(backward, ints, reals, ptrs, cu_seqlens, total_rows);
}

size_t selattn_emu_prefill_workspace_bytes(int backward, int64_t batch, int64_t heads_q,
                                          int64_t heads_kv, int64_t seqlen, int64_t head_dim,
                                          int dtype) {
  selattn::PrefillParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.batch = batch, p.heads_q = heads_q, p.heads_kv = heads_kv, p.seqlen = seqlen,
  p.head_dim = head_dim;
  return backward ? selattn::cuda::prefill_bwd_workspace_bytes(p)
                  : selattn::cuda::prefill_fwd_workspace_bytes(p);
}

// 32-row query blocks per superchunk of the CUDA prefill (its bounded Poff workspace).
int64_t selattn_emu_prefill_superchunk_blocks(int64_t batch, int64_t heads_q, int64_t heads_kv,
                                              int64_t seqlen, int64_t head_dim, int dtype) {
  selattn::PrefillParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.batch = batch, p.heads_q = heads_q, p.heads_kv = heads_kv, p.seqlen = seqlen,
  p.head_dim = head_dim;
  return selattn::cuda::superchunk_blocks(p);
}

// ---- decode: the real launcher -----------------------------------------------------------
// ints: dtype, B, Hq, Hkv, c, D, slots, budget, sel_head, has_tau, then strides (batch, head,
// row) of q k_new v_new k_cache v_cache out. reals: scale, tau.
// ptrs: q k_new v_new k_cache v_cache out f pos seq_len lengths.
int selattn_emu_decode(const int64_t* ints, const double* reals, void* const* ptrs) {
  selattn::DecodeParams p{};
  int i = 0;
  p.dtype = static_cast<DType>(ints[i++]);
  p.batch = ints[i++], p.heads_q = ints[i++], p.heads_kv = ints[i++], p.chunk = ints[i++];
  p.head_dim = ints[i++], p.slots = ints[i++], p.budget = ints[i++], p.sel_head = ints[i++];
  p.has_tau = ints[i++] != 0;
  auto s4 = [&](int64_t& b, int64_t& h, int64_t& r) { b = ints[i++], h = ints[i++], r = ints[i++]; };
  s4(p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  s4(p.k_new_batch_stride, p.k_new_head_stride, p.k_new_row_stride);
  s4(p.v_new_batch_stride, p.v_new_head_stride, p.v_new_row_stride);
  s4(p.k_cache_batch_stride, p.k_cache_head_stride, p.k_cache_row_stride);
  s4(p.v_cache_batch_stride, p.v_cache_head_stride, p.v_cache_row_stride);
  s4(p.out_batch_stride, p.out_head_stride, p.out_row_stride);
  p.scale = reals[0], p.tau = reals[1];
  int k = 0;
  p.q = ptrs[k++], p.k_new = ptrs[k++], p.v_new = ptrs[k++];
  p.k_cache = ptrs[k++], p.v_cache = ptrs[k++], p.out = ptrs[k++];
  p.f = ptrs[k++];
  p.pos = static_cast<int64_t*>(ptrs[k++]);
  p.seq_len = static_cast<int64_t*>(ptrs[k++]);
  p.lengths = static_cast<const int64_t*>(ptrs[k++]);
  if (!selattn::cuda::decode_supported(p.dtype, p.head_dim)) return 1;
  p.num_sms = 132;  // an H100 SXM, as the shim's cudaDeviceGetAttribute says
  // Tests force narrow column splits (several CTAs per kv group at small budgets).
  if (const char* cols = std::getenv("SELATTN_EMU_DECODE_SPLIT_COLS")) p.split_cols = std::atoll(cols);
  const size_t bytes = selattn::cuda::decode_workspace_bytes(p);
  Poisoned ws(bytes);
  p.workspace = ws.ptr, p.workspace_bytes = bytes;
  return selattn::cuda::decode_step(p, nullptr);
}

// ---- wrapper unit tests ------------------------------------------------------------------
int selattn_emu_ldmatrix_test(const uint16_t* in, uint32_t* out, int trans) {
  return run_one_warp(ldmatrix_test_kernel, in, out, trans);
}
int selattn_emu_mma_test(int bf16, const uint32_t* frag, float* c) {
  return bf16 ? run_one_warp(mma_test_kernel<__nv_bfloat16>, frag, c)
              : run_one_warp(mma_test_kernel<__half>, frag, c);
}
int selattn_emu_gemm_test(int bf16, const uint16_t* a, const uint16_t* b, float* c, int b_is_k_by_n) {
  return bf16 ? run_one_warp(gemm_test_kernel<__nv_bfloat16>, a, b, c, b_is_k_by_n)
              : run_one_warp(gemm_test_kernel<__half>, a, b, c, b_is_k_by_n);
}
int selattn_emu_shuffle_test(int arg, int width, int* out) {
  return run_one_warp(shuffle_test_kernel, arg, width, out);
}
int selattn_emu_race_test(int use_barrier, int* out) {
  return selattn::cuda::launch_kernel(race_test_kernel, dim3(1), dim3(64), 0, nullptr, use_barrier,
                                      out);
}
int selattn_emu_divergent_barrier_test(int* out) {
  return run_one_warp(divergent_barrier_kernel, out);
}
void selattn_emu_convert(const float* in, int64_t n, uint16_t* half_out, uint16_t* bf16_out) {
  for (int64_t e = 0; e < n; ++e) {
    const __half h = __float2half(in[e]);
    const __nv_bfloat16 b = __float2bfloat16(in[e]);
    std::memcpy(half_out + e, &h, 2);
    std::memcpy(bf16_out + e, &b, 2);
  }
}
void selattn_emu_widen(const uint16_t* half_in, const uint16_t* bf16_in, int64_t n, float* from_half,
                       float* from_bf16) {
  for (int64_t e = 0; e < n; ++e) {
    __half h;
    __nv_bfloat16 b;
    std::memcpy(&h, half_in + e, 2);
    std::memcpy(&b, bf16_in + e, 2);
    from_half[e] = __half2float(h);
    from_bf16[e] = __bfloat162float(b);
  }
}

// ---- diagnostics -------------------------------------------------------------------------
int selattn_emu_report_count() { return static_cast<int>(selattn::emu::reports().size()); }
// Copies report i (truncated to cap - 1 bytes); returns its full length.
int selattn_emu_report(int i, char* buf, int cap) {
  const auto all = selattn::emu::reports();
  if (i < 0 || i >= static_cast<int>(all.size())) return -1;
  std::snprintf(buf, size_t(cap), "%s", all[size_t(i)].c_str());
  return static_cast<int>(all[size_t(i)].size());
}
void selattn_emu_clear_reports() { selattn::emu::clear_reports(); }
void selattn_emu_stats(int64_t* out) {
  const auto s = selattn::emu::stats();
  out[0] = s.launches, out[1] = s.blocks, out[2] = s.threads, out[3] = s.switches;
}
// The launched kernels since the last clear, one demangled name per line.
int selattn_emu_launched(char* buf, int cap) {
  std::string all;
  for (const std::string& name : selattn::emu::launched_kernels()) all += name + "\n";
  std::snprintf(buf, size_t(cap), "%s", all.c_str());
  return static_cast<int>(all.size());
}
const char* selattn_emu_error_string(int err) { return selattn::emu::error_string(err); }

}  // extern "C"
