"""The CUDA kernels of csrc/cuda, run on the CPU (DESIGN §4.1).

The real device sources and launchers (csrc/cuda/prefill, csrc/cuda/decode,
csrc/cuda/instantiations) are compiled by the host C++ compiler against the shim in
csrc/cuda/emulation (one fiber per CUDA thread, exact-size poisoned shared memory, bit-exact
fp16/bf16, PTX wrappers emulated from the ISA fragment tables) into a shared library, built on
first use and cached under build/cuda_emulation/. The functions here take CPU tensors in the
layouts the CUDA ops accept and return what the CUDA ops return:

    from tools.cuda_emulation import emulated as emu      # or sys.path to this folder
    out, lse = emu.prefill_fwd(q, k, v, q_sel, k_sel, scale, path="tc")
    dq, dk, dv, dq_sel, dk_sel = emu.prefill_bwd(dout, q, k, v, q_sel, k_sel, out, lse, None,
                                                 scale, path="simt")
    out = emu.decode_step(q, k, v, k_cache, v_cache, f, pos, seq_len, None, scale, 0, 8, None)
    out, lse = emu.prefill_varlen_fwd(q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, scale,
                                      path="simt")      # packed (total, H, D), lse (H, total)

`path` is "simt" or "tc" (tensor cores; ValueError where that path does not apply). Every
call checks that the kernels it expected actually ran and raises EmulationError on a failed
launch or on any runtime report (deadlock, divergent warp collective, shuffle outside its
mask, ldmatrix outside shared memory, ...). Sanitizer builds: `load(sanitize="address")`
(ASan + UBSan) or `load(sanitize="thread")` (TSan with fiber annotations: the racecheck
analogue); the process must have the sanitizer runtime preloaded (run_all.py does that).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.join(ROOT, "build", "cuda_emulation")

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
TC_HEAD_DIMS = (32, 64, 96, 128)

# Planted defects (item 7 of the emulation issue): (file under csrc, original, replacement).
# Each must be caught by the reference comparison or a sanitizer; python_tests and run_all.py
# check that it is.
DEFECTS = {
    # One __syncthreads removed: the next chunk is staged while other warps still read this one.
    "missing_syncthreads": (
        "cuda/prefill/common.cuh",
        "    __syncthreads();  // xs/ys are restaged by the next chunk or the caller\n",
        "",
    ),
    # One fragment index off by one: P's A fragment for P V takes column 1 instead of row 8.
    "fragment_index": (
        "cuda/tc_mma.cuh",
        "    a[1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);\n",
        "    a[1] = pack2<T>(x[2 * kk][1], x[2 * kk][3]);\n",
    ),
    # One tail guard dropped: staging reads rows past N.
    "tail_guard": (
        "cuda/prefill/common.cuh",
        "    dst[r][c] = (row < rows && d < head_dim) ? A(to_acc(src[row * row_stride + d])) : A(0);\n",
        "    dst[r][c] = (d < head_dim) ? A(to_acc(src[row * row_stride + d])) : A(0);\n",
    ),
}

# Varlen defects (PrefillParams::cu_seqlens), invisible to every dense case (start 0, n = N):
DEFECTS.update({
    # v's rows taken from the start of the packed tensor instead of the sequence's own start.
    "varlen_offset": (
        "cuda/prefill/common.cuh",
        "  in.v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +\n"
        "         s0 * p.v_row_stride;\n",
        "  in.v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;\n",
    ),
    # The backward kernels read dout from the first sequence's rows for every sequence.
    # (A tail guard on max_seqlen instead of n is the other classic; it writes past the packed
    # outputs, i.e. corrupts the host heap of the emulation, so it is not planted in-process.)
    "varlen_dout_offset": (
        "cuda/prefill/common.cuh",
        "         rows.start * p.dout_row_stride;\n",
        "         0 * p.dout_row_stride;\n",
    ),
})

# The tensor-core pre-pass (tc_prepass.cuh): the C fragment's upper row half (c = 2, 3, rows
# g + 8) masked as row g + 7, so S[i][i - 1] of those rows is dropped from the column sums
# (only in the masked diagonal tiles; Poff of every later block is off at those keys).
DEFECTS.update({
    "tc_prepass_fragment_row": (
        "cuda/prefill/tc_prepass.cuh",
        "              const int64_t i = wrow0 + 16 * mt + 8 * h + fg;\n",
        "              const int64_t i = wrow0 + 16 * mt + 7 * h + fg;\n",
    ),
})

# The tensor-core cp.async pipelines (tc_fwd.cuh, tc_bwd.cuh): a barrier before a refill is
# gone, so a warp poisons a tile others still read (caught by TSan, or as a wrong answer
# when the fibers' order exposes it); or V is read one group too early, before it lands.
# (Removing the forward's barrier before the next K, K_sel refill is NOT caught: the fibers
# run the warps through Q K^T in lockstep, and TSan saw no race either (2026-12-01 run). A
# known blind spot, so it is not listed.)
DEFECTS.update({
    # The backward issues the next head's Q, dO (or the next query block's) without waiting
    # for the barrier after this head's last reads of them.
    "tc_bwd_early_prefetch": (
        "cuda/prefill/tc_bwd.cuh",
        "      __syncthreads();  // also: every warp is done with s_q, s_do (and, last head, s_qsel)\n",
        "",
    ),
    # The backward's head loop keeps only the latest head's dL^T in its dA sum (a group of 4
    # heads in one CTA then loses two heads' share of dQsel and dKsel).
    "tc_bwd_dsum_overwrite": (
        "cuda/prefill/tc_bwd.cuh",
        "              (hi == 0 ? 0.f : s_dsum[e * kThr + threadIdx.x]) + dlt[e / 4][e % 4];\n",
        "              0.f + dlt[e / 4][e % 4];\n",
    ),
    # PackGQA: the other heads' warps take F of row i + 8 for row i (a row-offset slip in the
    # shared F tile; the selection warps' own F stays right).
    "tc_fwd_packgqa_f_row": (
        "cuda/prefill/tc_fwd.cuh",
        "        const float2 lo = *reinterpret_cast<const float2*>(s_f + (wrow + g) * kFStride + col);\n",
        "        const float2 lo = *reinterpret_cast<const float2*>(s_f + (wrow + g + 8) * kFStride + col);\n",
    ),
    "tc_fwd_missing_wait": (
        "cuda/prefill/tc_fwd.cuh",
        "    cp_async_wait<1>();  // this thread's V copies have landed (the next K may be in flight)\n",
        "    cp_async_wait<2>();  // this thread's V copies have landed (the next K may be in flight)\n",
    ),
})

# Defects of the decode kernels (csrc/cuda/decode), caught by cases.decode_defect_probes().
DEFECTS.update({
    # The split combine forgets to rescale each split's partial sums to the common max.
    "decode_split_combine": (
        "cuda/decode/kernels.cuh",
        "      if (part_l[s] > A(0)) sum += part_acc[s * D + d] * exp_acc(part_m[s] - mx);\n",
        "      if (part_l[s] > A(0)) sum += part_acc[s * D + d];\n",
    ),
    # The barrier after P V is gone: the next tile's cp.async refills a stage still being read.
    "decode_missing_barrier": (
        "cuda/decode/kernels.cuh",
        "      __syncthreads();  // this stage and sc_s/corr_s are free for the next tile\n",
        "",
    ),
    # The chunk eviction's cut on positions off by one: the last victim stays.
    "decode_radix_cut": (
        "cuda/decode/kernels.cuh",
        "      if (x > fcut || (x == fcut && static_cast<uint64_t>(pos[j]) <= pcut)) pos[j] = -1;\n",
        "      if (x > fcut || (x == fcut && static_cast<uint64_t>(pos[j]) < pcut)) pos[j] = -1;\n",
    ),
    # One stage too few waited for: tile i is read before its cp.async copies land.
    "decode_missing_wait": (
        "cuda/decode/kernels.cuh",
        "      cp_async_wait<1>();  // this thread's copies of tile i have landed\n",
        "      cp_async_wait<2>();  // this thread's copies of tile i have landed\n",
    ),
    # Tensor-core chunks (tc_attend.cuh): the in-chunk cumsum of S taken inclusive (a token's
    # own S[t, j] counted in its offset), an off-by-one in the token index of the offsets.
    "decode_tc_inclusive_cumsum": (
        "cuda/decode/tc_attend.cuh",
        "          s[nt][e] = visible ? scale * s[nt][e] - off_s[r_tok[rh] * kCols + jj] : -INFINITY;\n",
        "          s[nt][e] = visible ? scale * s[nt][e] - off_s[(r_tok[rh] + 1) * kCols + jj] : -INFINITY;\n",
    ),
})

SANITIZE_FLAGS = {
    None: ["-O2"],
    "address": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                "-fno-sanitize=vptr", "-fsanitize-recover=all"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
}
SANITIZER_RUNTIME = {"address": "libasan.so", "thread": "libtsan.so"}


class EmulationError(RuntimeError):
    """A failed emulated launch, or a report of the emulation runtime."""


# ---- build -----------------------------------------------------------------------------------

def _sources(csrc: str) -> list:
    cuda = os.path.join(csrc, "cuda")
    inst = sorted(os.path.join(cuda, "instantiations", f)
                  for f in os.listdir(os.path.join(cuda, "instantiations")) if f.endswith(".cu"))
    return inst + [os.path.join(cuda, "prefill", "launch.cu"),
                   os.path.join(cuda, "decode", "launch.cu"),
                   os.path.join(cuda, "emulation", "runtime.cpp"),
                   os.path.join(cuda, "emulation", "entry.cpp")]


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _closure_digest(path: str, include_dirs: Sequence[str], flags: Sequence[str],
                    root: str) -> str:
    """Hash of a translation unit, every quoted header it includes (by path relative to
    `root`, the csrc/ being built, so a planted-defect copy reuses every object it does not
    change), and the flags."""
    h = hashlib.sha256("\0".join(flags).encode())
    seen, todo = set(), [path]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        text = open(p, "rb").read()
        h.update(os.path.relpath(p, root).encode() + b"\0" + text)
        for inc in _INCLUDE.findall(text.decode("utf-8", "replace")):
            for d in [os.path.dirname(p), *include_dirs]:
                cand = os.path.normpath(os.path.join(d, inc))
                if os.path.exists(cand):
                    todo.append(cand)
                    break
    return h.hexdigest()[:20]


def _compile_all(csrc: str, outdir: str, sanitize: Optional[str]) -> str:
    include_dirs = [os.path.join(csrc, "cuda", "emulation", "include"), csrc]
    # -fno-strict-aliasing: CUDA code reinterprets uint4 vectors as float/half arrays, which
    # nvcc compiles as meant; g++ would be entitled to drop such loads.
    base = ["-std=c++20", "-fPIC", "-fno-strict-aliasing", "-DSELATTN_HOST_EMULATION"] + \
        SANITIZE_FLAGS[sanitize]
    objs_dir = os.path.join(CACHE, "objects")
    os.makedirs(objs_dir, exist_ok=True)
    jobs = []
    for src in _sources(csrc):
        flags = list(base)
        if sanitize == "thread" and src.endswith("runtime.cpp"):
            # The scheduler's own state is not kernel memory: not instrumented (it still calls
            # the TSan fiber and sync annotations).
            flags = [f for f in flags if f != "-fsanitize=thread"] + ["-DSELATTN_EMU_TSAN=1"]
        digest = _closure_digest(src, include_dirs, flags, csrc)
        obj = os.path.join(objs_dir, f"{os.path.basename(src)}.{digest}.o")
        jobs.append((src, obj, flags))

    def build(job):
        src, obj, flags = job
        if os.path.exists(obj):
            return obj
        tmp = obj + f".tmp{os.getpid()}"
        cmd = ["g++", *flags, *[f"-I{d}" for d in include_dirs], "-x", "c++", "-c", src, "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EmulationError(f"compiling {src} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, obj)
        return obj

    workers = int(os.environ.get("MAX_JOBS", os.cpu_count() or 2))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        objs = list(pool.map(build, jobs))
    link_digest = hashlib.sha256("".join(objs).encode()).hexdigest()[:20]
    lib = os.path.join(outdir, f"libselattn_emu_{sanitize or 'plain'}_{link_digest}.so")
    if not os.path.exists(lib):
        os.makedirs(outdir, exist_ok=True)
        link = ["g++", "-shared", *SANITIZE_FLAGS[sanitize], *objs, "-o", lib + ".tmp", "-lpthread"]
        proc = subprocess.run(link, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EmulationError(f"linking the emulation failed:\n{proc.stderr[-4000:]}")
        os.replace(lib + ".tmp", lib)
    return lib


def _planted_tree(defect: str) -> str:
    """A scratch copy of csrc/ with one defect planted (never touches the working tree)."""
    fname, old, new = DEFECTS[defect]
    tmp = tempfile.mkdtemp(prefix=f"selattn_defect_{defect}_")
    dst = os.path.join(tmp, "csrc")
    shutil.copytree(os.path.join(ROOT, "csrc"), dst)
    path = os.path.join(dst, fname)
    text = open(path).read()
    if text.count(old) != 1:
        raise EmulationError(f"defect {defect}: the text to replace is not in {fname} exactly once")
    open(path, "w").write(text.replace(old, new))
    return dst


_LOADED: dict = {}
_LOCK = threading.Lock()


def load(sanitize: Optional[str] = None, defect: Optional[str] = None) -> "Emulation":
    """Builds (or reuses) the emulation library for this source tree and loads it."""
    if sanitize not in SANITIZE_FLAGS:
        raise ValueError(f"sanitize must be None, 'address' or 'thread', got {sanitize!r}")
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"defect must be one of {sorted(DEFECTS)}, got {defect!r}")
    key = (sanitize, defect)
    with _LOCK:
        if key not in _LOADED:
            csrc = os.path.join(ROOT, "csrc") if defect is None else _planted_tree(defect)
            try:
                lib_path = _compile_all(csrc, os.path.join(CACHE, "lib"), sanitize)
            finally:
                if defect is not None:
                    shutil.rmtree(os.path.dirname(csrc), ignore_errors=True)
            _LOADED[key] = Emulation(lib_path, sanitize)
        return _LOADED[key]


# ---- calls -----------------------------------------------------------------------------------

def _ptr(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(None)


def _strides(t: Optional[torch.Tensor], n: int) -> list:
    return list(t.stride()[:n]) if t is not None else [0] * n


def _nan_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.full(t.shape, float("nan"), dtype=dtype or t.dtype)


def _aligned16(t: torch.Tensor) -> bool:
    es = t.element_size()
    return t.data_ptr() % 16 == 0 and all(
        (s * es) % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


class Emulation:
    """One loaded build of the emulation (plain or sanitized)."""

    def __init__(self, path: str, sanitize: Optional[str]):
        self.path, self.sanitize = path, sanitize
        self.lib = lib = ctypes.CDLL(path)
        i64p, f64p = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_double)
        vpp = ctypes.POINTER(ctypes.c_void_p)
        lib.selattn_emu_prefill.argtypes = [ctypes.c_int, i64p, f64p, vpp]
        lib.selattn_emu_prefill_varlen.argtypes = [ctypes.c_int, i64p, f64p, vpp,
                                                   ctypes.c_void_p, ctypes.c_int64]
        lib.selattn_emu_decode.argtypes = [i64p, f64p, vpp]
        lib.selattn_emu_report.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.selattn_emu_launched.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.selattn_emu_error_string.restype = ctypes.c_char_p
        lib.selattn_emu_convert.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                            ctypes.c_void_p]
        lib.selattn_emu_widen.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_void_p, ctypes.c_void_p]
        lib.selattn_emu_stats.argtypes = [i64p]
        i64 = ctypes.c_int64
        lib.selattn_emu_prefill_workspace_bytes.argtypes = [ctypes.c_int, i64, i64, i64, i64, i64,
                                                            ctypes.c_int]
        lib.selattn_emu_prefill_workspace_bytes.restype = ctypes.c_size_t
        lib.selattn_emu_prefill_superchunk_blocks.argtypes = [i64, i64, i64, i64, i64,
                                                              ctypes.c_int]
        lib.selattn_emu_prefill_superchunk_blocks.restype = i64
        self._lock = threading.Lock()

    # -- diagnostics
    def reports(self) -> list:
        out = []
        buf = ctypes.create_string_buffer(4096)
        for i in range(self.lib.selattn_emu_report_count()):
            self.lib.selattn_emu_report(i, buf, len(buf))
            out.append(buf.value.decode())
        return out

    def launched(self) -> list:
        buf = ctypes.create_string_buffer(1 << 20)
        self.lib.selattn_emu_launched(buf, len(buf))
        return [line for line in buf.value.decode().splitlines() if line]

    def stats(self) -> dict:
        arr = (ctypes.c_int64 * 4)()
        self.lib.selattn_emu_stats(arr)
        return dict(zip(("launches", "blocks", "threads", "switches"), list(arr)))

    def _finish(self, rc: int, what: str, expect: Sequence[str]):
        reports = self.reports()
        launched = self.launched()
        if rc != 0:
            msg = self.lib.selattn_emu_error_string(rc).decode()
            raise EmulationError(f"{what}: launch failed ({msg}); reports: {reports[:5]}")
        if reports:
            raise EmulationError(f"{what}: {len(reports)} runtime report(s): {reports[:5]}")
        for name in expect:
            if not any(name in k for k in launched):
                raise EmulationError(f"{what}: expected kernel {name!r} to run, ran {launched}")
        return launched

    def _call(self, fn, *args):
        with self._lock:
            self.lib.selattn_emu_clear_reports()
            return fn(*args)

    # -- wrapper unit tests (single warp)
    def ldmatrix(self, tile: torch.Tensor, trans: bool) -> torch.Tensor:
        """tile: (32, 8) int16 bit patterns, row r addressed by lane r. -> (32, 4) uint32 regs."""
        src = tile.contiguous().view(torch.int16)
        out = torch.zeros(32, 4, dtype=torch.int64)
        raw = torch.zeros(32 * 4, dtype=torch.int32)
        rc = self._call(self.lib.selattn_emu_ldmatrix_test, _ptr(src), _ptr(raw), int(trans))
        self._finish(rc, "ldmatrix test", ["ldmatrix_test_kernel"])
        out.copy_(raw.view(32, 4).to(torch.int64) & 0xffffffff)
        return out

    def mma(self, frags: torch.Tensor, c: torch.Tensor, bf16: bool) -> torch.Tensor:
        """frags: (32, 6) uint32 (as int64) per lane {a0..a3, b0, b1}; c: (32, 4) fp32."""
        f = frags.to(torch.int64).to(torch.int32).contiguous()  # wraps to the same 32 bits
        cc = c.to(torch.float32).clone().contiguous()
        rc = self._call(self.lib.selattn_emu_mma_test, int(bf16), _ptr(f), _ptr(cc))
        self._finish(rc, "mma test", ["mma_test_kernel"])
        return cc

    def gemm(self, a: torch.Tensor, b: torch.Tensor, b_is_k_by_n: bool) -> torch.Tensor:
        """(16 x 16) bf16/fp16 A and B as the kernels load them -> A @ B (fp32 accumulate)."""
        bf16 = a.dtype == torch.bfloat16
        ab = a.contiguous().view(torch.int16)
        bb = (b if b_is_k_by_n else b.t()).contiguous().view(torch.int16)
        c = torch.full((16, 16), float("nan"), dtype=torch.float32)
        rc = self._call(self.lib.selattn_emu_gemm_test, int(bf16), _ptr(ab), _ptr(bb), _ptr(c),
                        int(b_is_k_by_n))
        self._finish(rc, "gemm test", ["gemm_test_kernel"])
        return c

    def shuffles(self, arg: int, width: int) -> torch.Tensor:
        out = torch.zeros(4, 32, dtype=torch.int32)
        rc = self._call(self.lib.selattn_emu_shuffle_test, arg, width, _ptr(out))
        self._finish(rc, "shuffle test", ["shuffle_test_kernel"])
        return out

    def divergent_barrier(self):
        out = torch.zeros(32, dtype=torch.int32)
        rc = self._call(self.lib.selattn_emu_divergent_barrier_test, _ptr(out))
        return rc, self.reports()

    def convert(self, x: torch.Tensor):
        """float32 -> (fp16 bits, bf16 bits) as int16 tensors, by the shim's conversions."""
        x = x.to(torch.float32).contiguous()
        h = torch.empty(x.numel(), dtype=torch.int16)
        b = torch.empty(x.numel(), dtype=torch.int16)
        self.lib.selattn_emu_convert(x.data_ptr(), x.numel(), h.data_ptr(), b.data_ptr())
        return h, b

    def widen(self, h: torch.Tensor, b: torch.Tensor):
        h, b = h.contiguous(), b.contiguous()
        fh = torch.empty(h.numel(), dtype=torch.float32)
        fb = torch.empty(b.numel(), dtype=torch.float32)
        self.lib.selattn_emu_widen(h.data_ptr(), b.data_ptr(), h.numel(), fh.data_ptr(),
                                   fb.data_ptr())
        return fh, fb

    # -- host-side sizes of the real launcher (no kernel runs)
    def prefill_workspace_bytes(self, backward: bool, batch: int, heads_q: int, heads_kv: int,
                                seqlen: int, head_dim: int, dtype: torch.dtype) -> int:
        """prefill_{fwd,bwd}_workspace_bytes of csrc/cuda/prefill/launch.cu."""
        return int(self.lib.selattn_emu_prefill_workspace_bytes(
            int(backward), batch, heads_q, heads_kv, seqlen, head_dim, DTYPE_CODE[dtype]))

    def prefill_superchunk_blocks(self, batch: int, heads_q: int, heads_kv: int, seqlen: int,
                                  head_dim: int, dtype: torch.dtype) -> int:
        """32-row query blocks per superchunk (csrc/cuda/prefill/dispatch.h)."""
        return int(self.lib.selattn_emu_prefill_superchunk_blocks(
            batch, heads_q, heads_kv, seqlen, head_dim, DTYPE_CODE[dtype]))

    # -- the ops
    def _set_path(self, path: str, q: torch.Tensor, tensors: Sequence[torch.Tensor]):
        if path not in ("simt", "tc"):
            raise ValueError(f"path must be 'simt' or 'tc', got {path!r}")
        if path == "tc":
            why = None
            if q.dtype not in (torch.bfloat16, torch.float16):
                why = f"dtype {q.dtype} (tensor cores need bfloat16 or float16)"
            elif q.shape[-1] not in TC_HEAD_DIMS:
                why = f"head_dim {q.shape[-1]} (tensor-core kernels: {TC_HEAD_DIMS})"
            elif not all(_aligned16(t) for t in tensors):
                why = "rows that are not 16-byte aligned"
            if why:
                raise ValueError(f"the tensor-core path does not apply: {why}")
            os.environ.pop("SELATTN_CUDA_FORCE_SIMT", None)
            os.environ.pop("SELATTN_CUDA_TC_BWD", None)  # the default: tensor-core backward
        else:
            os.environ["SELATTN_CUDA_FORCE_SIMT"] = "1"
            os.environ.pop("SELATTN_CUDA_TC_BWD", None)

    def _prefill(self, backward: bool, q, k, v, q_sel, k_sel, out, lse, mem, dout, dlse, dmem,
                 grads, scale: float, mem_tau: Optional[float], varlen=None):
        if varlen is None:
            B, Hq, N, D = q.shape
            s4 = lambda t: _strides(t, 3)  # noqa: E731
            s3 = lambda t: _strides(t, 2)  # noqa: E731
        else:  # packed (total, H, D) / (total, D): batch stride 0, rows are the packed rows
            cu, N = varlen
            B, (_, Hq, D) = cu.numel() - 1, q.shape
            s4 = lambda t: [0, t.stride(1), t.stride(0)] if t is not None else [0] * 3  # noqa
            s3 = lambda t: [0, t.stride(0)] if t is not None else [0] * 2  # noqa: E731
        ints = [DTYPE_CODE[q.dtype], B, Hq, k.shape[1], N, D]
        for t in (q, k, v, out, dout, *grads[:3]):
            ints += s4(t)
        for t in (q_sel, k_sel, *grads[3:]):
            ints += s3(t)
        ints_arr = (ctypes.c_int64 * len(ints))(*ints)
        reals = (ctypes.c_double * 2)(float(scale), float(mem_tau or 0.0))
        ptrs = [q, k, v, q_sel, k_sel, out, lse, mem, dout, dlse, dmem, *grads]
        ptr_arr = (ctypes.c_void_p * len(ptrs))(*[t.data_ptr() if t is not None else None
                                                  for t in ptrs])
        if varlen is None:
            return self._call(self.lib.selattn_emu_prefill, int(backward), ints_arr, reals,
                              ptr_arr)
        return self._call(self.lib.selattn_emu_prefill_varlen, int(backward), ints_arr, reals,
                          ptr_arr, _ptr(varlen[0]), int(q.shape[0]))

    def prefill_fwd(self, q, k, v, q_sel, k_sel, scale, mem_tau=None, *, path):
        """As torch.ops.selattn.prefill_fwd on CUDA: (out, lse), or (out, lse, mem)."""
        self._set_path(path, q, (q, k, v, q_sel, k_sel))
        stats_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, Hq, N, D = q.shape
        out = _nan_like(q)
        lse = torch.full((B, Hq, N), float("nan"), dtype=stats_dtype)
        mem = torch.full((B, N), float("nan"), dtype=stats_dtype) if mem_tau else None
        rc = self._prefill(False, q, k, v, q_sel, k_sel, out, lse, mem, None, None, None,
                           [None] * 5, scale, mem_tau)
        self._finish(rc, "prefill_fwd", ["tc_fwd_kernel" if path == "tc" else "simt_fwd_kernel"])
        return (out, lse, mem) if mem_tau else (out, lse)

    def prefill_bwd(self, dout, q, k, v, q_sel, k_sel, out, lse, dlse, scale, dmem=None,
                    mem_tau=None, *, path):
        """As torch.ops.selattn.prefill_bwd on CUDA: (dq, dk, dv, dq_sel, dk_sel)."""
        self._set_path(path, q, (q, k, v, q_sel, k_sel, dout))
        grads = [_nan_like(t) for t in (q, k, v, q_sel, k_sel)]
        lse = lse.contiguous()
        dlse = dlse.contiguous() if dlse is not None else None
        dmem = dmem.contiguous() if dmem is not None else None
        rc = self._prefill(True, q, k, v, q_sel, k_sel, out, lse, None, dout, dlse, dmem, grads,
                           scale, mem_tau if dmem is not None else None)
        self._finish(rc, "prefill_bwd", ["tc_bwd_kernel" if path == "tc" else "simt_bwd_kernel"])
        return tuple(grads)

    # -- varlen (packed ragged batches, PrefillParams::cu_seqlens)
    @staticmethod
    def _varlen_args(q, cu_seqlens, max_seqlen):
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor")
        cu = cu_seqlens.contiguous()
        lengths = (cu[1:] - cu[:-1]).tolist()
        if int(cu[0]) != 0 or int(cu[-1]) != q.shape[0] or min(lengths, default=0) < 0 \
                or max(lengths, default=0) > max_seqlen:
            raise ValueError(f"bad cu_seqlens {cu.tolist()} for total {q.shape[0]} and "
                             f"max_seqlen {max_seqlen}")
        # Nothing is launched when there is nothing to compute (as the launcher decides).
        runs = cu.numel() > 1 and max_seqlen > 0 and q.shape[1] > 0 and q.shape[0] > 0
        return cu, runs

    def prefill_varlen_fwd(self, q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, scale,
                           mem_tau=None, *, path):
        """As torch.ops.selattn.prefill_varlen_fwd on CUDA: q (total, Hq, D), k/v (total, Hkv,
        D), q_sel/k_sel (total, D), cu_seqlens int32 (B + 1,). Returns (out, lse (Hq, total)),
        or (out, lse, mem (total,))."""
        self._set_path(path, q, (q, k, v, q_sel, k_sel))
        cu, runs = self._varlen_args(q, cu_seqlens, max_seqlen)
        stats_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        total, Hq, _ = q.shape
        out = _nan_like(q)
        lse = torch.full((Hq, total), float("nan"), dtype=stats_dtype)
        mem = torch.full((total,), float("nan"), dtype=stats_dtype) if mem_tau else None
        rc = self._prefill(False, q, k, v, q_sel, k_sel, out, lse, mem, None, None, None,
                           [None] * 5, scale, mem_tau, varlen=(cu, max_seqlen))
        self._finish(rc, "prefill_varlen_fwd",
                     [("tc_fwd_kernel" if path == "tc" else "simt_fwd_kernel")] if runs else [])
        return (out, lse, mem) if mem_tau else (out, lse)

    def prefill_varlen_bwd(self, dout, q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, out, lse,
                           dlse, scale, dmem=None, mem_tau=None, *, path):
        """As torch.ops.selattn.prefill_varlen_bwd on CUDA: (dq, dk, dv, dq_sel, dk_sel)."""
        self._set_path(path, q, (q, k, v, q_sel, k_sel, dout))
        cu, runs = self._varlen_args(q, cu_seqlens, max_seqlen)
        grads = [_nan_like(t) for t in (q, k, v, q_sel, k_sel)]
        lse = lse.contiguous()
        dlse = dlse.contiguous() if dlse is not None else None
        dmem = dmem.contiguous() if dmem is not None else None
        rc = self._prefill(True, q, k, v, q_sel, k_sel, out, lse, None, dout, dlse, dmem, grads,
                           scale, mem_tau if dmem is not None else None, varlen=(cu, max_seqlen))
        self._finish(rc, "prefill_varlen_bwd",
                     [("tc_bwd_kernel" if path == "tc" else "simt_bwd_kernel")] if runs else [])
        return tuple(grads)

    def decode_step(self, q, k, v, k_cache, v_cache, f, pos, seq_len, lengths, scale, sel_head,
                    budget, tau, split_cols: Optional[int] = None):
        """As torch.ops.selattn.decode_step on CUDA: returns out; updates the cache tensors.
        `split_cols` forces the key columns per split-KV CTA (default: the launcher's plan)."""
        if split_cols is None:
            os.environ.pop("SELATTN_EMU_DECODE_SPLIT_COLS", None)
        else:
            os.environ["SELATTN_EMU_DECODE_SPLIT_COLS"] = str(int(split_cols))
        B, Hq, c, D = q.shape
        ints = [DTYPE_CODE[q.dtype], B, Hq, k.shape[1], c, D, k_cache.shape[2], budget, sel_head,
                int(tau is not None)]
        out = _nan_like(q)
        for t in (q, k, v, k_cache, v_cache, out):
            ints += _strides(t, 3)
        ints_arr = (ctypes.c_int64 * len(ints))(*ints)
        reals = (ctypes.c_double * 2)(float(scale), float(tau or 0.0))
        ptrs = [q, k, v, k_cache, v_cache, out, f, pos, seq_len, lengths]
        ptr_arr = (ctypes.c_void_p * len(ptrs))(*[t.data_ptr() if t is not None else None
                                                  for t in ptrs])
        rc = self._call(self.lib.selattn_emu_decode, ints_arr, reals, ptr_arr)
        # bf16/fp16 chunks at the tensor-core head dims take attend_tc_kernel (tc_attend.cuh).
        tc = q.dtype in (torch.bfloat16, torch.float16) and D in TC_HEAD_DIMS and c > 1
        attend = "attend_tc_kernel<" if tc else "attend_kernel<"
        launched = self._finish(rc, "decode_step", [attend, "finish_kernel"])
        if len(launched) != 2:  # a step is two launches (CUDA-graph friendly)
            raise EmulationError(f"decode_step: expected two launches, ran {launched}")
        return out


def prefill_fwd(q, k, v, q_sel, k_sel, scale, mem_tau=None, *, path):
    """See Emulation.prefill_fwd (default, unsanitized build)."""
    return load().prefill_fwd(q, k, v, q_sel, k_sel, scale, mem_tau, path=path)


def prefill_bwd(dout, q, k, v, q_sel, k_sel, out, lse, dlse, scale, dmem=None, mem_tau=None, *,
                path):
    """See Emulation.prefill_bwd (default, unsanitized build)."""
    return load().prefill_bwd(dout, q, k, v, q_sel, k_sel, out, lse, dlse, scale, dmem, mem_tau,
                              path=path)


def prefill_varlen_fwd(q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, scale, mem_tau=None, *,
                       path):
    """See Emulation.prefill_varlen_fwd (default, unsanitized build)."""
    return load().prefill_varlen_fwd(q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, scale,
                                     mem_tau, path=path)


def prefill_varlen_bwd(dout, q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, out, lse, dlse,
                       scale, dmem=None, mem_tau=None, *, path):
    """See Emulation.prefill_varlen_bwd (default, unsanitized build)."""
    return load().prefill_varlen_bwd(dout, q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, out,
                                     lse, dlse, scale, dmem, mem_tau, path=path)


def decode_step(q, k, v, k_cache, v_cache, f, pos, seq_len, lengths, scale, sel_head, budget, tau,
                split_cols=None):
    """See Emulation.decode_step (default, unsanitized build)."""
    return load().decode_step(q, k, v, k_cache, v_cache, f, pos, seq_len, lengths, scale,
                              sel_head, budget, tau, split_cols)
