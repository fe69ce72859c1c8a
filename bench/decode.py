"""Decode-step latency of the pruned KV cache against full-length caches.

For each history length N and budget M (N/32 .. N/2) it times, in one process, alternating:
  ours        selattn_ext.decode: one new token against a cache pruned to M tokens
  eager_full  the same selective step done with torch ops on a full-length cache (F kept for
              all N tokens: logits - F, softmax, @V, then F += relu(selection logits))
  sdpa_full   plain SDPA decode on the full-length cache (no selection: the usual KV cache)
and reports medians, tokens/s and the ratios eager_full/ours, sdpa_full/ours, for each batch
size given. With ``--device cuda`` it also reports the bytes ours must read per step, as GB/s
and as a fraction of a measured device-to-device copy bandwidth.

Chunked prefill (``--prefill-n``, on by default on the CPU): an N-token prompt fed into a
``SelectiveKVCache(budget, max_chunk=chunk)`` chunk by chunk, against the fused full
``selattn_ext.attention`` forward over the same N tokens and plain causal SDPA, alternating.
``cache_bytes`` is ``cache.memory_bytes()``: state plus step workspace.

    python bench/decode.py                     # CPU, N in {2K, 8K}, B in {1, 8}, prefill 8K
    python bench/decode.py --n 2048 8192 32768 --out bench/results
    python bench/decode.py --device cuda --dtype bfloat16 --out bench/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F_nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import git_commit, machine_name, slug  # noqa: E402
import roofline  # noqa: E402

import selattn_ext  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class Timer:
    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn, inner: int) -> float:
        """Seconds per call, averaged over `inner` back-to-back calls."""
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


def randn(shape, gen, device, dtype):
    """Normal values made on `device`: on CUDA from the device generator (seeded by
    torch.manual_seed), so GB-sized caches need no host tensors; on the CPU from `gen`."""
    if device == "cuda":
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def filled_cache(b, h, d, n, budget, dtype, device, gen):
    """A cache in the state after N tokens: BOS plus the most recent budget-1 tokens kept,
    positive F. Filled directly: decoding N tokens first would only cost setup time."""
    cache = selattn_ext.SelectiveKVCache(b, h, d, budget, dtype=dtype, device=device)
    cache.k_cache.copy_(randn(cache.k_cache.shape, gen, device, dtype))
    cache.v_cache.copy_(randn(cache.v_cache.shape, gen, device, dtype))
    kept = torch.cat([torch.zeros(1, dtype=torch.int64), torch.arange(n - budget + 1, n)])
    cache.pos[:, :budget] = kept.to(device)
    cache.f[:, 1:budget] = torch.rand(b, budget - 1, generator=gen).to(cache.f)
    cache.seq_len.fill_(n)
    return cache


class FullCache:
    """The full-length alternatives: every token kept (N + steps rows preallocated)."""

    def __init__(self, b, h, d, n, extra, dtype, device, gen, scale):
        self.k = randn((b, h, n + extra, d), gen, device, dtype)
        self.v = randn((b, h, n + extra, d), gen, device, dtype)
        f_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.f = torch.rand(b, n + extra, generator=gen).to(device=device, dtype=f_dtype)
        self.f[:, 0] = 0
        self.n0 = self.n = n
        self.scale = scale

    def rewind(self):
        self.n = self.n0

    def append(self, k, v):
        n = self.n
        self.k[:, :, n:n + 1] = k
        self.v[:, :, n:n + 1] = v
        self.f[:, n] = 0
        self.n = n + 1
        return n

    def eager_step(self, q, k, v):
        # One new token: its logits over tokens 0..n with F subtracted, then the F update.
        n = self.append(k, v) + 1
        keys, vals, f = self.k[:, :, :n], self.v[:, :, :n], self.f[:, :n]
        b, h, _, d = q.shape
        hkv = keys.shape[1]
        qg = q.reshape(b, hkv, h // hkv, d)  # GQA: the g heads of a kv head share its keys
        logits = self.scale * (qg @ keys.transpose(-1, -2)) - f[:, None, None, :].to(q.dtype)
        out = (torch.softmax(logits.float(), dim=-1).to(q.dtype) @ vals).reshape(b, h, 1, d)
        sel = (self.scale * (q[:, 0] @ keys[:, 0].transpose(-1, -2)))[:, 0].relu()
        sel[:, 0] = 0  # no BOS
        sel[:, n - 1] = 0  # no self
        f.add_(sel.to(f.dtype))
        return out

    def sdpa_step(self, q, k, v):
        n = self.append(k, v) + 1
        return F_nn.scaled_dot_product_attention(q, self.k[:, :, :n], self.v[:, :, :n],
                                                 scale=self.scale,
                                                 enable_gqa=q.shape[1] != self.k.shape[1])


def copy_bandwidth(device, timer) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write bytes)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timer(lambda: dst.copy_(src), 10) for _ in range(5)]
    return 2 * src.numel() / statistics.median(times) / 1e9


def run(args):
    device, dtype = args.device, DTYPES[args.dtype]
    timer = Timer(device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the device generator behind randn() on CUDA
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    elt = torch.empty((), dtype=dtype).element_size()
    bw = copy_bandwidth(device, timer) if device == "cuda" else None
    rows = []
    for b, n in [(b, n) for b in args.batch for n in args.n]:
        budgets = ([m for m in args.budgets if m < n] if args.budgets else
                   [n // div for div in (32, 16, 8, 4, 2) if n // div >= 1])
        steps = args.reps * args.inner + args.warmup * args.inner
        full = None if args.no_full else FullCache(b, hkv, d, n, steps + 1, dtype, device, gen,
                                                   scale)
        for budget in budgets:
            cache = filled_cache(b, hkv, d, n, budget, dtype, device, gen)
            q = torch.randn(b, h, 1, d, generator=gen).to(device=device, dtype=dtype)
            kn = torch.randn(b, hkv, 1, d, generator=gen).to(device=device, dtype=dtype)
            vn = torch.randn(b, hkv, 1, d, generator=gen).to(device=device, dtype=dtype)
            fns = {"ours": lambda: selattn_ext.decode(q, kn, vn, cache, scale=scale)}
            if full is not None:
                fns["eager_full"] = lambda: full.eager_step(q, kn, vn)
                fns["sdpa_full"] = lambda: full.sdpa_step(q, kn, vn)
                full.rewind()
            times = {name: [] for name in fns}
            for rep in range(args.warmup + args.reps):
                for name, fn in fns.items():  # alternate so load spikes hit all alike
                    if name != "ours":
                        full.rewind()
                    t = timer(fn, args.inner)
                    if rep >= args.warmup:
                        times[name].append(t)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            row = dict(n=n, budget=budget, batch=b, heads=h, kv_heads=hkv, head_dim=d,
                       dtype=args.dtype, device=device,
                       **{f"{name}_us": med[name] * 1e6 for name in med},
                       ours_tokens_per_s=b / med["ours"],
                       eager_full_over_ours=med["eager_full"] / med["ours"] if full else None,
                       sdpa_full_over_ours=med["sdpa_full"] / med["ours"] if full else None,
                       cache_bytes=cache.memory_bytes(),
                       full_cache_bytes=2 * b * hkv * n * d * elt + b * n * 4)
            if bw is not None:
                moved = 2 * b * hkv * cache.slots * d * elt + b * cache.slots * 12
                row["ours_gb_per_s"] = moved / med["ours"] / 1e9
                row["ours_fraction_of_copy_bw"] = row["ours_gb_per_s"] / bw
                # bench/roofline.py's bytes of a step (K/V once per kv head, F, pos, q, out)
                # at the measured copy bandwidth: the time a memory-bound step could take.
                ideal = roofline.decode_step_bytes(b, h, hkv, cache.slots, d, elt)["ideal_bytes"]
                row["roofline_us"] = ideal / (bw * 1e9) * 1e6
                row["ours_pct_of_roofline"] = 100.0 * row["roofline_us"] / row["ours_us"]
            rows.append(row)
            print(f"B={b:3d} N={n:6d} M={budget:6d}  ours {row['ours_us']:9.1f} us  "
                  + (f"eager_full {row['eager_full_us']:9.1f} us ({row['eager_full_over_ours']:5.1f}x)"
                     f"  sdpa_full {row['sdpa_full_us']:9.1f} us ({row['sdpa_full_over_ours']:5.1f}x)"
                     if full else "")
                  + (f"  {row['ours_gb_per_s']:.0f} GB/s ({row['ours_fraction_of_copy_bw']:.2f} of "
                     f"copy, {row['ours_pct_of_roofline']:.0f}% of roofline)" if bw else ""),
                  flush=True)
    return rows, bw


def chunked_prefill(args):
    """Chunked prefill into a pruned cache vs the fused full forward, alternating, medians."""
    device, dtype = args.device, DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(1)
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    rows = []
    for n in args.prefill_n:
        b, budget, chunk = 1, args.prefill_budget, args.prefill_chunk
        q = torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(b, hkv, n, d, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(b, hkv, n, d, generator=gen).to(device=device, dtype=dtype)
        cache = selattn_ext.SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk, dtype=dtype,
                                             device=device)

        def chunked():
            cache.reset()
            for s in range(0, n, chunk):
                selattn_ext.decode(q[:, :, s:s + chunk], k[:, :, s:s + chunk],
                                   v[:, :, s:s + chunk], cache)

        fns = {
            "chunked": chunked,
            "full_fused": lambda: selattn_ext.attention(q, k, v),
            "sdpa_causal": lambda: F_nn.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=h != hkv),
        }
        times = {name: [] for name in fns}
        timer = Timer(device)
        with torch.no_grad():
            for rep in range(args.prefill_warmup + args.prefill_reps):
                for name, fn in fns.items():
                    t = timer(fn, 1)
                    if rep >= args.prefill_warmup:
                        times[name].append(t)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        row = dict(n=n, budget=budget, chunk=chunk, batch=b, heads=h, kv_heads=hkv, head_dim=d,
                   dtype=args.dtype, device=device,
                   **{f"{name}_s": med[name] for name in med},
                   **{f"{name}_all_s": times[name] for name in times},
                   chunked_over_full_fused=med["chunked"] / med["full_fused"],
                   chunked_over_sdpa_causal=med["chunked"] / med["sdpa_causal"],
                   cache_bytes=cache.memory_bytes(), cache_state_bytes=cache.state_bytes(),
                   cache_workspace_bytes=cache.workspace_bytes())
        rows.append(row)
        print(f"prefill N={n} budget={budget} chunk={chunk}: chunked {med['chunked']:.3f} s, "
              f"full fused {med['full_fused']:.3f} s (chunked/full = "
              f"{row['chunked_over_full_fused']:.2f}), sdpa causal {med['sdpa_causal']:.3f} s",
              flush=True)
    return rows


def markdown_chunked(rows) -> str:
    cols = ["n", "budget", "chunk", "chunked_s", "full_fused_s", "sdpa_causal_s",
            "chunked_over_full_fused", "chunked_over_sdpa_causal", "cache_bytes",
            "cache_state_bytes", "cache_workspace_bytes"]
    lines = ["## chunked prefill into the pruned cache vs the full forward", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows, meta) -> str:
    cols = ["batch", "n", "budget", "ours_us", "eager_full_us", "sdpa_full_us", "eager_full_over_ours",
            "sdpa_full_over_ours", "ours_tokens_per_s", "cache_bytes", "full_cache_bytes"]
    if rows and "ours_gb_per_s" in rows[0]:
        cols += ["ours_gb_per_s", "ours_fraction_of_copy_bw", "roofline_us",
                 "ours_pct_of_roofline"]
    lines = [f"# decode step: {meta['machine']} ({meta['device']}), {meta['date']}, "
             f"commit {meta['commit']}", "",
             f"B={meta['batch']} Hq={meta['heads']} Hkv={meta['kv_heads']} D={meta['head_dim']} "
             f"{meta['dtype']}, torch threads {meta['threads']}, medians of {meta['reps']} "
             f"alternating runs x {meta['inner']} steps; load average at the start "
             f"{meta['load_average_start']}, at the end {meta['load_average']} on "
             f"{meta['cpu_count']} CPUs (shared machine: other jobs ran alongside)."
             + (f" Copy bandwidth {meta['copy_gb_per_s']:.0f} GB/s." if meta.get("copy_gb_per_s")
                else ""), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r.get(c):.2f}" if isinstance(r.get(c), float) else
                 ("" if r.get(c) is None else str(r[c])) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--n", type=int, nargs="+", default=None,
                    help="history lengths (default: 2048 8192 on CPU, +32768 on CUDA)")
    ap.add_argument("--max-n", type=int, default=None, help="drop history lengths above this")
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="batch sizes of the decode rows (default: 1 8 on CPU, 1 on CUDA)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--budgets", type=int, nargs="+", default=None,
                    help="budgets to time (those below each N); default N/32 .. N/2")
    ap.add_argument("--no-full", action="store_true",
                    help="time only the pruned cache (no full-length baselines: a budget sweep)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--inner", type=int, default=5, help="steps per timed run")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (CPU; default: torch's choice)")
    ap.add_argument("--prefill-n", type=int, nargs="*", default=None,
                    help="chunked-prefill prompt lengths (default: 8192 on CPU, none on CUDA)")
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--prefill-reps", type=int, default=5)
    ap.add_argument("--prefill-warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="directory for JSON + markdown results")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.n is None:
        args.n = [2048, 8192] + ([32768] if args.device == "cuda" else [])
    if args.batch is None:
        args.batch = [1, 8] if args.device == "cpu" else [1]
    if args.prefill_n is None:
        args.prefill_n = [8192] if args.device == "cpu" else []
    if args.max_n is not None:
        args.n = [n for n in args.n if n <= args.max_n]
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU")

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    chunked_rows = chunked_prefill(args)
    rows, bw = run(args)
    meta = dict(machine=machine_name(args.device), device=args.device,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                commit=git_commit(), batch=args.batch, heads=args.heads,
                kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
                threads=torch.get_num_threads(), reps=args.reps, inner=args.inner,
                torch=torch.__version__, copy_gb_per_s=bw,
                load_average_start=load_start,
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                cpu_count=os.cpu_count())
    md = markdown(rows, meta) + ("\n" + markdown_chunked(chunked_rows) if chunked_rows else "")
    print()
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H%M%S")
        stem = os.path.join(args.out, f"decode_{args.device}_{slug(meta['machine'])}_"
                                      f"{meta['date']}T{stamp}_{meta['commit']}")
        with open(stem + ".json", "w") as fh:
            json.dump(dict(meta=meta, rows=rows, chunked_prefill=chunked_rows), fh, indent=1)
        with open(stem + ".md", "w") as fh:
            fh.write(md)
        print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
