"""Prefill benchmark: fused selective attention against what a user can do without it.

Methods (all compute the same function except ``sdpa_causal``):
  ours         selattn_ext.attention (fused; O(N) memory per head)
  naive        selattn_ext.reference.attention: x-transformers style, all N x N logits per head
  sdpa_fmask   F computed eagerly (B x N x N), then SDPA with the float mask ``causal - F``
               (the F computation is counted)
  flex         (CUDA) FlexAttention, F as a captured buffer read by score_mod (F counted)
  sdpa_causal  plain causal SDPA without selection: the ceiling, it does less work

Modes: ``fwd`` and ``fwdbwd`` (forward + backward of all inputs). Calls alternate between methods
and the median of ``--reps`` is reported, with ratios ``ours / method`` and peak memory growth
(CPU: each (method, N, mode) once in a fresh subprocess, peak RSS (VmHWM, reset after the inputs
were made) above the RSS at that point; CUDA: max_memory_allocated above the allocation before the call).

    python bench/prefill.py                      # CPU defaults of the foundation issue
    python bench/prefill.py --device cuda --out /tmp/o   # CUDA grid of the CUDA issue
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import selattn_ext  # noqa: E402
from selattn_ext import reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def causal_minus_f(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, 1, N, N) float mask: -F on and below the diagonal, -inf above."""
    q_sel, k_sel = reference.selection_inputs(q, k, 0)
    f = reference.accumulated_selection(q_sel, k_sel, scale)
    n = q.shape[-2]
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    return (-f).masked_fill(future, float("-inf"))[:, None]


def _expand_kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    if g == 1:
        return k, v
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)


def sdpa_fmask(q, k, v):
    scale = q.shape[-1] ** -0.5
    mask = causal_minus_f(q, k, scale).to(q.dtype)
    kk, vv = _expand_kv(q, k, v)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)


def sdpa_causal(q, k, v):
    kk, vv = _expand_kv(q, k, v)
    return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)


_FLEX_CACHE: Dict[tuple, object] = {}


def flex(q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, hq, n, d = q.shape
    key = (n, q.device)
    if key not in _FLEX_CACHE:
        def causal(b_, h_, qi, kj):
            return kj <= qi
        _FLEX_CACHE[key] = (create_block_mask(causal, None, None, n, n, device=q.device),
                            torch.compile(flex_attention, dynamic=False))
    block_mask, compiled = _FLEX_CACHE[key]
    q_sel, k_sel = reference.selection_inputs(q, k, 0)
    f = reference.accumulated_selection(q_sel, k_sel, d ** -0.5).to(q.dtype)

    def score_mod(score, b_, h_, qi, kj):
        return score - f[b_, qi, kj]

    kk, vv = _expand_kv(q, k, v)
    return compiled(q, kk, vv, score_mod=score_mod, block_mask=block_mask)


METHODS: Dict[str, Callable] = {
    "ours": lambda q, k, v: selattn_ext.attention(q, k, v),
    "naive": lambda q, k, v: reference.attention(q, k, v),
    "sdpa_fmask": sdpa_fmask,
    "flex": flex,
    "sdpa_causal": sdpa_causal,
}


def make_inputs(args, n: int, requires_grad: bool, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[args.dtype]
    shapes = [(args.batch_for(n), args.heads, n, args.head_dim)] + \
             [(args.batch_for(n), args.kv_heads, n, args.head_dim)] * 2
    # Unit normal q, k with scale D**-0.5 give selection logits of std ~1: F is far from 0.
    ts = [torch.randn(s, generator=g).to(device=args.device, dtype=dtype) for s in shapes]
    for t in ts:
        t.requires_grad_(requires_grad)
    return ts


def make_call(method: str, inputs, mode: str) -> Callable[[], None]:
    fn = METHODS[method]
    q, k, v = inputs
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(q, k, v)
        return call
    dout = torch.randn_like(q)

    def call():
        for t in inputs:
            t.grad = None
        fn(q, k, v).backward(dout)
    return call


def estimated_nn_bytes(args, n: int) -> int:
    """Rough size of one (B, H, N, N) tensor in the benchmark dtype; the naive method holds several."""
    return args.batch_for(n) * args.heads * n * n * torch.finfo(DTYPES[args.dtype]).bits // 8


def methods_for(args, n: int) -> List[str]:
    ms = ["ours", "naive", "sdpa_fmask", "sdpa_causal"]
    if args.device == "cuda" and "flex" not in args.skip and n in args.flex_seqlens:
        ms.insert(3, "flex")
    if args.device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if 8 * estimated_nn_bytes(args, n) > free:
            ms.remove("naive")
    return [m for m in ms if m not in args.skip]


def child_peak(args, method: str, n: int, mode: str) -> Optional[int]:
    """CPU peak RSS growth of one call, measured in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child-peak", method, "--child-n", str(n),
           "--child-mode", mode, "--device", "cpu", "--dtype", args.dtype,
           "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
           "--head-dim", str(args.head_dim), "--batch", str(args.batch_for(n)),
           "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def run_child_peak(args) -> None:
    inputs = make_inputs(args, args.child_n, args.child_mode == "fwdbwd")
    call = make_call(args.child_peak, inputs, args.child_mode)
    # Reset the peak-RSS mark (Linux >= 4.0) so import-time peaks do not mask the call's.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss_kb = _proc_status_kb("VmRSS")
    call()
    peak_kb = _proc_status_kb("VmHWM")
    print(json.dumps({"peak_bytes": max(0, peak_kb - rss_kb) * 1024}))


def accuracy(args, n: int) -> float:
    """Max |ours - fp64 reference| on the benchmark inputs (forward)."""
    q, k, v = make_inputs(args, n, False, seed=1)
    with torch.no_grad():
        ours = selattn_ext.attention(q, k, v).double()
        ref = reference.attention(q.double(), k.double(), v.double())
    return (ours - ref).abs().max().item()


def time_alternating_cpu(fns: Dict[str, Callable[[], None]], reps: int):
    """Median wall seconds and median process CPU seconds (all threads) per call, calls
    interleaved round-robin. On a shared, oversubscribed machine the wall time mostly measures
    the share of the cores a method's threads were given; the CPU time is what it cost."""
    wall: Dict[str, List[float]] = {name: [] for name in fns}
    cpu: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = lambda d: {n: statistics.median(v) for n, v in d.items()}  # noqa: E731
    return med(wall), med(cpu)


def load_average() -> str:
    """The machine's 1/5/15-minute load averages (the benchmark shares its cores with others)."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run_memory_only(args) -> List[dict]:
    """Peak memory growth only (no timing): long sequences where timed repetitions cost too much."""
    rows = []
    for n in args.seqlens:
        for mode in args.modes:
            row = {"N": n, "B": args.batch_for(n), "mode": mode}
            for m in methods_for(args, n):
                peak = child_peak(args, m, n, mode)
                row[f"{m}_peak_MB"] = None if peak is None else peak / 2**20
            if row.get("ours_peak_MB") and row.get("sdpa_causal_peak_MB"):
                row["ours/sdpa_causal_peak"] = row["ours_peak_MB"] / row["sdpa_causal_peak_MB"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def run(args) -> None:
    if args.memory_only:
        load_before = load_average()
        rows = run_memory_only(args)
        columns = list(rows[0])
        meta = {"dtype": args.dtype, "heads": args.heads, "kv_heads": args.kv_heads,
                "head_dim": args.head_dim, "batch": args.batch, "threads": torch.get_num_threads(),
                "memory_only": True, "load_before": load_before, "load_after": load_average()}
        stem = common.write_results(args.out, f"prefill_mem_d{args.head_dim}", args.device, meta,
                                    rows, columns)
        print(common.markdown_table(rows, columns))
        print(f"wrote {stem}.json / .md")
        return
    rows = []
    load_before = load_average()
    for n in args.seqlens:
        acc = accuracy(args, min(n, 1024))
        for mode in args.modes:
            methods = methods_for(args, n)
            inputs = make_inputs(args, n, mode == "fwdbwd")
            calls, failed = {}, {}
            for m in methods:
                call = make_call(m, inputs, mode)
                try:
                    call()  # also the warm-up/compile call
                    calls[m] = call
                except Exception as e:  # e.g. OOM, an unsupported backward
                    failed[m] = type(e).__name__
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
            reps = args.reps if n <= 2048 or args.device == "cuda" else max(3, args.reps // 2)
            if args.device == "cpu":
                times, cpu_times = time_alternating_cpu(calls, reps)
            else:
                times, cpu_times = common.time_alternating(calls, args.device, reps, warmup=0), {}
            row = {"N": n, "B": args.batch_for(n), "mode": mode, "max_err_fwd": acc}
            for m in methods:
                row[f"{m}_ms"] = times[m] * 1e3 if m in times else failed.get(m)
            for m in methods:
                if m != "ours" and m in times and "ours" in times:
                    row[f"ours/{m}"] = times["ours"] / times[m]
                    if m in cpu_times:
                        row[f"ours/{m}_cpu"] = cpu_times["ours"] / cpu_times[m]
            for m in cpu_times:
                row[f"{m}_cpu_ms"] = cpu_times[m] * 1e3
            if not args.no_memory:
                for m in calls:
                    if args.device == "cuda":
                        peak = common.cuda_peak_bytes(calls[m])
                    else:
                        peak = child_peak(args, m, n, mode)
                    row[f"{m}_peak_MB"] = None if peak is None else peak / 2**20
            rows.append(row)
            print(json.dumps(row), flush=True)
            del inputs, calls
            if args.device == "cuda":
                torch.cuda.empty_cache()
    columns = ["N", "B", "mode"] + [c for c in rows[0] if c.endswith("_ms")] + \
              sorted({c for r in rows for c in r if c.startswith("ours/")}) + \
              [c for c in rows[0] if c.endswith("_peak_MB")] + ["max_err_fwd"]
    meta = {"dtype": args.dtype, "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "tokens_per_batch": args.tokens, "batch": args.batch,
            "reps": args.reps, "threads": torch.get_num_threads(),
            "load_before": load_before, "load_after": load_average(),
            "selattn_ext": os.path.dirname(selattn_ext.__file__)}
    stem = common.write_results(args.out, f"prefill_d{args.head_dim}{args.tag}", args.device, meta,
                                rows, columns)
    print(common.markdown_table(rows, columns))
    print(f"wrote {stem}.json / .md")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp32 (CPU), bf16 (CUDA)")
    p.add_argument("--seqlens", default=None, help="comma list; default 512..4096 (CPU), 1K..16K (CUDA)")
    p.add_argument("--head-dims", default=None, help="comma list; default 64 (CPU), 64,128 (CUDA)")
    p.add_argument("--heads", type=int, default=None, help="query heads; default 8 (CPU), 16 (CUDA)")
    p.add_argument("--kv-heads", type=int, default=None, help="default: = heads")
    p.add_argument("--batch", type=int, default=1, help="batch size (ignored when --tokens is set)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per batch: B = tokens // N (CUDA default 16384)")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--reps", type=int, default=None, help="timed calls per method (default 7 CPU, 10 CUDA)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--skip", default="", help="comma list of methods to leave out")
    p.add_argument("--flex-seqlens", default="4096,8192",
                   help="CUDA: sequence lengths that also run FlexAttention (each compiles anew)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--memory-only", action="store_true",
                   help="only the peak-memory measurements (one call per method and N, no timing)")
    p.add_argument("--tag", default="",
                   help="appended to the result name, e.g. _base when timing another build via PYTHONPATH")
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    p.add_argument("--child-peak", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-n", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--head-dim", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.seqlens = [int(x) for x in (args.seqlens or ("1024,2048,4096,8192,16384" if cuda else
                                                     "512,1024,2048,4096")).split(",")]
    args.head_dims = [int(x) for x in (args.head_dims or ("64,128" if cuda else "64")).split(",")]
    args.heads = args.heads or (16 if cuda else 8)
    args.kv_heads = args.kv_heads or args.heads
    args.tokens = args.tokens or (16384 if cuda else None)
    args.batch_for = (lambda n: max(1, args.tokens // n)) if args.tokens else (lambda n: args.batch)
    args.modes = args.modes.split(",")
    args.reps = args.reps or (10 if cuda else 7)
    args.flex_seqlens = [int(x) for x in args.flex_seqlens.split(",") if x]
    args.skip = [s for s in args.skip.split(",") if s]
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child_peak:
        run_child_peak(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    torch.manual_seed(0)
    for d in args.head_dims:
        args.head_dim = d
        run(args)


if __name__ == "__main__":
    main()
