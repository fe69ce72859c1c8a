"""The CUDA prefill paths against plain causal attention, with the cost model's bounds.

Times, in one process and alternating, for bf16 at each head dim and N (16K tokens per batch:
B = 16384 // N, H = 16 by default):
  tc          our tensor-core forward / backward (the default for bf16 at these head dims;
              SELATTN_CUDA_TC_BWD unset)
  simt        our SIMT forward / backward (SELATTN_CUDA_FORCE_SIMT=1), only up to --simt-max-n
              (it is ~50-100x slower; the cost model says how much)
  sdpa_flash  torch's scaled_dot_product_attention, causal, flash backend only
  fa2         flash_attn.flash_attn_func(causal=True), when the package imports
Modes: fwd, and fwdbwd (forward then backward of q, k, v; ours through the raw ops, so the
selection gradients are computed too). For each: median ms, the ratio to sdpa_flash (and fa2),
peak memory above the inputs, and the measured time as a percentage of bench/roofline.py's
lower bound for that path on this GPU (FA2's bound for sdpa_flash and fa2). A first GPU run so
tells where each kernel stands against what its code could reach.

    python bench/prefill_paths.py --out DIR                      # on a GPU (bench/gpu_check.sh)
    python bench/prefill_paths.py --device cpu --dry-run          # the plumbing, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import roofline  # noqa: E402

import selattn_ext  # noqa: E402
from selattn_ext import ops, reference  # noqa: E402

ENV_OF_PATH = {"tc": {"SELATTN_CUDA_TC_BWD": None, "SELATTN_CUDA_FORCE_SIMT": None},
               "simt": {"SELATTN_CUDA_FORCE_SIMT": "1", "SELATTN_CUDA_TC_BWD": None}}


@contextlib.contextmanager
def path_env(path: Optional[str]):
    """The launcher reads these variables at every call (csrc/cuda/prefill/launch.cu)."""
    saved = {k: os.environ.get(k) for k in ("SELATTN_CUDA_TC_BWD", "SELATTN_CUDA_FORCE_SIMT")}
    try:
        for k, v in (ENV_OF_PATH.get(path) or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def flash_attn_func():
    try:
        from flash_attn import flash_attn_func as fn  # type: ignore
        return fn
    except Exception:
        return None


def sdpa_context(device: str):
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def make_calls(method: str, mode: str, q, k, v, dout, device: str) -> Callable[[], None]:
    """One call of `method` in `mode` on fixed inputs (fresh leaves for autograd baselines)."""
    scale = q.shape[-1] ** -0.5
    if method in ("tc", "simt"):
        qs, ks = reference.selection_inputs(q, k, 0)

        def fwd():
            with path_env(method), torch.no_grad():
                return ops.prefill_fwd(q, k, v, qs, ks, scale)

        if mode == "fwd":
            return fwd

        def fwdbwd():
            out, lse = fwd()
            with path_env(method):
                ops.prefill_bwd(dout, q, k, v, qs, ks, out, lse, None, scale)
        return fwdbwd
    if method == "sdpa_flash":
        def attn(a, b, c):
            with sdpa_context(device):
                return F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale)
    elif method == "fa2":
        fn = flash_attn_func()

        def attn(a, b, c):  # flash_attn takes (B, N, H, D)
            return fn(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2),
                      causal=True, softmax_scale=scale).transpose(1, 2)
    else:
        raise ValueError(method)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                attn(q, k, v)
        return call
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def call():
        for t in leaves:
            t.grad = None
        attn(*leaves).backward(dout)
    return call


def bound_ms(method: str, mode: str, b: Dict[str, object]) -> Optional[float]:
    """Lower bound (ms) of `method` in `mode` from roofline.prefill_bounds."""
    key = "fa2" if method in ("sdpa_flash", "fa2") else method
    us = b[f"{key}_fwd_us"] + (b[f"{key}_bwd_us"] if mode == "fwdbwd" else 0.0)
    return us / 1e3


def gpu_model(device: str) -> roofline.Gpu:
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    return roofline.H200 if "H200" in name else roofline.H100


def time_calls(calls: Dict[str, Callable[[], None]], device: str, reps: int) -> Dict[str, float]:
    if device == "cuda":
        return common.time_alternating(calls, device, reps, warmup=1)
    out = {}
    for name, fn in calls.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = (time.perf_counter() - t0) / reps
    return out


def run(args) -> List[dict]:
    dev = args.device
    gpu = gpu_model(dev)
    methods = ["tc", "simt", "sdpa_flash"] + (["fa2"] if flash_attn_func() and dev == "cuda" else [])
    rows = []
    gen = torch.Generator().manual_seed(0)
    for d in args.head_dims:
        for n in args.seqlens:
            b = max(1, args.tokens // n)
            h = args.heads
            # Unit normal q, k, v made on the device (no large host tensors), never zeros.
            q, k, v, dout = (torch.randn(b, h, n, d, generator=gen).to(dev, torch.bfloat16)
                             if dev == "cpu" else
                             torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16)
                             for _ in range(4))
            bounds = roofline.prefill_bounds(roofline.Shape(b, h, h, n, d), gpu, args.tc_rate)
            for mode in args.modes:
                use = [m for m in methods
                       if m != "simt" or n <= (args.simt_max_n if mode == "fwd"
                                               else args.simt_max_n // 2)]
                calls, failed = {}, {}
                for m in use:
                    fn = make_calls(m, mode, q, k, v, dout, dev)
                    try:
                        fn()
                        calls[m] = fn
                    except Exception as e:  # an unsupported backend, OOM: recorded, not fatal
                        failed[m] = f"{type(e).__name__}: {str(e)[:120]}"
                times = time_calls(calls, dev, args.reps)
                row = dict(D=d, N=n, B=b, H=h, mode=mode)
                for m in use:
                    row[f"{m}_ms"] = times[m] * 1e3 if m in times else None
                    if m in failed:
                        row[f"{m}_error"] = failed[m]
                for m in times:
                    if m != "sdpa_flash" and "sdpa_flash" in times:
                        row[f"{m}/sdpa"] = times[m] / times["sdpa_flash"]
                    if m in ("tc", "simt") and "fa2" in times:
                        row[f"{m}/fa2"] = times[m] / times["fa2"]
                    bnd = bound_ms(m, mode, bounds)
                    row[f"{m}_bound_ms"] = bnd
                    row[f"{m}_pct_of_bound"] = 100.0 * bnd / (times[m] * 1e3)
                if dev == "cuda" and not args.no_memory:
                    for m, fn in calls.items():
                        row[f"{m}_peak_MB"] = common.cuda_peak_bytes(fn) / 2**20
                rows.append(row)
                print(summary_line(row), flush=True)
            del q, k, v, dout
            if dev == "cuda":
                torch.cuda.empty_cache()
    return rows


def summary_line(r: dict) -> str:
    parts = [f"D{r['D']} N{r['N']:>5} B{r['B']:>2} {r['mode']:6}"]
    for m in ("tc", "simt", "sdpa_flash", "fa2"):
        if r.get(f"{m}_ms") is not None:
            ratio = f" {r[f'{m}/sdpa']:.2f}x" if f"{m}/sdpa" in r else ""
            parts.append(f"{m} {r[f'{m}_ms']:.3f} ms{ratio} ({r[f'{m}_pct_of_bound']:.0f}% of bound)")
    return "  ".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch: B = tokens // N")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--simt-max-n", type=int, default=4096,
                   help="largest N timed on the SIMT path (fwd; fwdbwd: half of it)")
    p.add_argument("--tc-rate", default="spec", choices=["spec", "measured", "mma_sync"],
                   help="tensor-core rate of the bound (roofline.prefill_bounds)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes, 1 rep: checks the plumbing (on the CPU kernels too)")
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    args = p.parse_args(argv)
    args.seqlens = [int(x) for x in args.seqlens.split(",")]
    args.head_dims = [int(x) for x in args.head_dims.split(",")]
    args.modes = args.modes.split(",")
    if args.dry_run:
        args.seqlens, args.head_dims, args.heads = [64, 128], [32], 2
        args.tokens, args.reps, args.simt_max_n = 128, 1, 128
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device (use --device cpu --dry-run to check the script)")
    rows = run(args)
    columns = ["D", "N", "B", "mode"] + sorted({c for r in rows for c in r if c.endswith("_ms")
                                                and not c.endswith("bound_ms")}) + \
        sorted({c for r in rows for c in r if "/" in c}) + \
        sorted({c for r in rows for c in r if c.endswith("_pct_of_bound")}) + \
        sorted({c for r in rows for c in r if c.endswith("_peak_MB")})
    meta = {"dtype": "bf16", "heads": args.heads, "tokens_per_batch": args.tokens,
            "reps": args.reps, "bound": f"bench/roofline.py, {gpu_model(args.device).name}, "
                                        f"tensor rate {args.tc_rate}",
            "flash_attn": flash_attn_func() is not None,
            "selattn_ext": os.path.dirname(selattn_ext.__file__)}
    name = "prefill_paths" + ("_dryrun" if args.dry_run else "")
    stem = common.write_results(args.out, name, args.device, meta, rows, columns,
                                notes="`*_pct_of_bound`: the cost model's lower bound over the "
                                      "measured time (100% = at the bound).")
    print(f"wrote {stem}.json / .md")


if __name__ == "__main__":
    main()
