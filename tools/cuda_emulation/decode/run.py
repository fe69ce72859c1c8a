"""Checks the CUDA decode kernels on the CPU by emulation, against the eager reference loop.

    python tools/cuda_emulation/decode/run.py

Strips the CUDA includes and the <<<>>> launchers from csrc/cuda/decode_kernels.cuh, compiles it
with emu.cpp (g++, C++20, pthreads) and runs random multi-step schedules (chunk sizes, ragged
lengths, tau, GQA, sel_head, forced split counts including empty splits) comparing outputs, kept
positions, F and seq_len with selattn_ext.reference.ReferenceKVCache. Not a substitute for a GPU
run: no real memory model, fast-math exp or bf16/fp16 conversions.
"""

import ctypes
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)
from selattn_ext.reference import ReferenceKVCache  # noqa: E402


def build(tmp):
    src = open(os.path.join(ROOT, "csrc/cuda/decode_kernels.cuh")).read()
    for inc in ("#include <cuda_bf16.h>\n", "#include <cuda_fp16.h>\n", "#include <cuda_runtime.h>\n"):
        src = src.replace(inc, "")
    src = src[:src.index("// ---- launch ----")] + src[src.index("// One per element type"):]
    with open(os.path.join(tmp, "kernels_emu.h"), "w") as fh:
        fh.write(src)
    lib = os.path.join(tmp, "libemu.so")
    subprocess.check_call(["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC",
                           "-I", os.path.join(ROOT, "csrc"), "-I", tmp,
                           os.path.join(HERE, "emu.cpp"), "-o", lib])
    lib = ctypes.CDLL(lib)
    i64, f64, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    lib.emu_decode.argtypes = ([ctypes.c_int] + [i64] * 8 + [f64, ctypes.c_int, f64, i64]
                               + [ptr] * 10)
    return lib


def addr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def run(lib, seed, dtype, d, hq, hkv, bsz, budget, max_chunk, tau, sel_head, splits, steps,
        ties=False):
    gen = torch.Generator().manual_seed(seed)
    slots = budget + max_chunk
    kc = torch.zeros(bsz, hkv, slots, d, dtype=dtype)
    vc = torch.zeros_like(kc)
    f = torch.zeros(bsz, slots, dtype=dtype)
    pos = torch.full((bsz, slots), -1, dtype=torch.int64)
    seq = torch.zeros(bsz, dtype=torch.int64)
    ref = ReferenceKVCache(budget, tau=tau, sel_head=sel_head)
    worst = 0.0
    for s in range(steps):
        c = int(torch.randint(1, max_chunk + 1, (), generator=gen))
        q = torch.randn(bsz, hq, c, d, generator=gen, dtype=torch.float64).to(dtype) * 1.5
        k = torch.randn(bsz, hkv, c, d, generator=gen, dtype=torch.float64).to(dtype) * 1.5
        v = torch.randn(bsz, hkv, c, d, generator=gen, dtype=torch.float64).to(dtype)
        if ties:  # selection logits all negative: F stays 0, every eviction is a tie
            k = torch.ones_like(k)
            q = -q.abs() - 0.5
        lengths = torch.randint(0, c + 1, (bsz,), generator=gen) if s % 3 == 2 else None
        out = torch.full_like(q, float("nan"))
        rc = lib.emu_decode(0 if dtype == torch.float32 else 1, bsz, hq, hkv, c, d, slots, budget,
                            sel_head % hq, d ** -0.5, int(tau is not None), tau or 0.0, splits,
                            addr(q), addr(k), addr(v), addr(kc), addr(vc), addr(out), addr(f),
                            addr(pos), addr(seq), addr(lengths))
        assert rc == 0, "head dim not instantiated in emu.cpp"
        expected = ref.step(q, k, v, lengths=None if lengths is None else lengths.tolist())
        worst = max(worst, (out - expected).abs().max().item())
        kept = [sorted(p for p in row if p >= 0) for row in pos.tolist()]
        assert kept == ref.positions(), (s, kept, ref.positions())
        assert seq.tolist() == [st["length"] for st in ref.seqs]
        tol = 1e-9 if dtype == torch.float64 else 1e-3
        for b in range(bsz):
            ours = {p: float(f[b, j]) for j, p in enumerate(pos[b].tolist()) if p >= 0}
            theirs = dict(zip(ref.seqs[b]["pos"], ref.seqs[b]["f"].tolist()))
            assert max([abs(ours[p] - theirs[p]) for p in ours] + [0.0]) < tol
    return worst


CASES = [  # seed, dtype, D, Hq, Hkv, B, budget, max_chunk, tau, sel_head, splits, steps[, ties]
    (0, torch.float64, 32, 2, 2, 1, 6, 1, None, 0, 1, 10),
    (1, torch.float64, 64, 4, 2, 2, 5, 3, None, 3, 3, 10),
    (2, torch.float64, 32, 6, 1, 2, 8, 4, 1.5, -2, 2, 10),
    (3, torch.float32, 64, 2, 2, 1, 300, 2, None, 0, 4, 40),
    (4, torch.float32, 96, 4, 1, 2, 4, 5, None, 1, 2, 10),
    (5, torch.float32, 32, 2, 1, 3, 1, 3, None, 0, 5, 10),
    (6, torch.float64, 64, 2, 2, 1, 40, 1, 0.8, 1, 7, 10),
    (7, torch.float64, 32, 2, 1, 2, 4, 3, None, 0, 2, 10, True),
]

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(tmp)
        for case in CASES:
            err = run(lib, *case)
            tol = 1e-12 if case[1] == torch.float64 else 1e-5
            status = "ok" if err < tol else "FAIL"
            print(f"case {case[0]}: {case[1]} D={case[2]} Hq/Hkv={case[3]}/{case[4]} B={case[5]} "
                  f"budget={case[6]} max_chunk={case[7]} tau={case[8]} splits={case[10]}: "
                  f"max|out - ref| = {err:.2e} {status}", flush=True)
            assert status == "ok"
    print("all emulated cases match the reference (outputs, kept positions, F, seq_len)")
