"""Short demo (``bash run.sh demo``): agreement with the fp64 reference, then speed vs baselines.

Runs on CUDA when a GPU is present, else on the CPU. Takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prefill  # noqa: E402

import selattn_ext  # noqa: E402
from selattn_ext import reference  # noqa: E402


def agreement(device: str) -> None:
    print(f"== agreement with the fp64 reference ({device}) ==")
    torch.manual_seed(0)
    b, hq, hkv, n, d = 2, 8, 2, 257, 64
    for dtype in ([torch.float32, torch.bfloat16] if device == "cpu" else [torch.bfloat16, torch.float16]):
        q = torch.randn(b, hq, n, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, hkv, n, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, hkv, n, d, device=device, dtype=dtype, requires_grad=True)
        dout = torch.randn_like(q)
        out = selattn_ext.attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref_out, f = reference.attention(*ref_in, return_f=True)
        ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
        errs = [(out.double() - ref_out).abs().max().item()] + \
               [(g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads)]
        print(f"{str(dtype):15s} B={b} Hq={hq} Hkv={hkv} N={n} D={d}  max F={f.max().item():.1f}  "
              f"max|err| out={errs[0]:.2e} dq={errs[1]:.2e} dk={errs[2]:.2e} dv={errs[3]:.2e}")


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    agreement(device)
    print(f"\n== speed against the baselines ({device}); times in ms, ratios ours/baseline ==")
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--device", device, "--no-memory", "--reps", "5", "--out", tmp]
        argv += ["--seqlens", "1024,2048"] if device == "cpu" else ["--seqlens", "4096", "--head-dims", "128"]
        prefill.main(argv)


if __name__ == "__main__":
    main()
