"""Does selective attention help, and how small can its cache get? (byte-level LMs, stdlib text)

Trains two byte-level LMs of identical size, seed, data order and steps on the .py sources of
the running Python's standard library (split by file, see examples/tiny_lm.py): a baseline with
plain causal attention and a selective one (selattn_ext). Then evaluates on the validation files:
  - both models unpruned (full prefill);
  - the selective model through the pruned KV cache (decode path, one token per step) with
    per-layer budgets N/2 .. N/32;
  - the baseline with a sliding-window cache (BOS + the most recent tokens, StreamingLLM style)
    at the same budgets — the simple alternative.
With a budget b, each query sees at most b + 1 tokens in both pruned evaluations (b kept plus
itself). Writes JSON (name contains "quality"), markdown and a PNG into --out.

    python bench/quality.py                 # defaults: context 256, 2 seeds, ~20 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import common  # noqa: E402
from tiny_lm import VOCAB, TinyLM, TinyLMConfig, load_stdlib_bytes, windows  # noqa: E402
from train_tiny_lm import evaluate, train  # noqa: E402

import selattn_ext  # noqa: E402


def val_batches(data: torch.Tensor, context: int, num: int, batch: int):
    starts = torch.linspace(0, len(data) - context - 1, num * batch).long()
    return [windows(data, context, starts[i:i + batch]) for i in range(0, num * batch, batch)]


@torch.no_grad()
def pruned_loss(model: TinyLM, batches, budget: int, chunk: int) -> float:
    """Selective model decoded through one SelectiveKVCache per layer with this budget."""
    model.eval()
    losses = []
    for inputs, targets in batches:
        caches = [selattn_ext.SelectiveKVCache(inputs.shape[0], blk.attn.num_kv_heads,
                                               blk.attn.head_dim, budget, max_chunk=chunk)
                  for blk in model.blocks]
        logits = model(inputs, caches)
        losses.append(F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)).item())
    return statistics.mean(losses)


@torch.no_grad()
def window_loss(model: TinyLM, batches, budget: int) -> float:
    """Baseline model where query i sees BOS and tokens i-budget+1 .. i (budget + 1 at most)."""
    model.eval()
    losses = []
    for inputs, targets in batches:
        n = inputs.shape[1]
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        allowed = (j <= i) & ((j == 0) | (i - j < budget))
        x = model.embed(inputs)
        for blk in model.blocks:
            attn = blk.attn
            q, k, v = attn._project(blk.norm1(x), torch.arange(n))
            g = attn.num_heads // attn.num_kv_heads
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                               attn_mask=allowed)
            x = x + attn.out_proj(o.transpose(1, 2).reshape(x.shape[0], n, -1))
            x = x + blk.mlp(blk.norm2(x))
        logits = model.head(model.norm(x))
        losses.append(F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)).item())
    return statistics.mean(losses)


def plot(result: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(int(b) for b in result["pruned_val_loss"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(budgets, [result["pruned_val_loss"][str(b)] for b in budgets], "o-", label="selective, pruned cache")
    ax.plot(budgets, [result["window_val_loss"][str(b)] for b in budgets], "s-", label="baseline, sliding window")
    ax.axhline(result["selective_val_loss"], color="C0", ls="--", label="selective, full context")
    ax.axhline(result["baseline_val_loss"], color="C1", ls="--", label="baseline, full context")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"cache budget per layer (tokens; context {result['context']})")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"{result['params']:,} params, {result['steps']} steps, seeds {result['seeds']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=256, help="training/eval context (512, 1024 for bigger runs)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", default="0,1", help="comma list; each seed trains both models")
    p.add_argument("--divisors", default="2,4,8,16,32", help="budgets = context / divisor")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--chunk", type=int, default=1, help="tokens per decode step in the pruned evaluation")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    train_data, val_data, counts = load_stdlib_bytes()
    print(f"data (stdlib .py files, split by path hash): {counts}", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [args.context // int(d) for d in args.divisors.split(",")]
    batches = val_batches(val_data, args.context, args.val_batches, args.batch)
    per_seed: List[Dict] = []
    for seed in seeds:
        res: Dict = {"seed": seed, "pruned": {}, "window": {}}
        models = {}
        for selective in (False, True):
            cfg = TinyLMConfig(dim=args.dim, layers=args.layers, heads=args.heads,
                               selective=selective, context=args.context)
            t0 = time.time()
            models[selective] = train(cfg, args.steps, args.batch, args.lr, seed, train_data)
            name = "selective" if selective else "baseline"
            res[name] = evaluate(models[selective], val_data, args.context, args.val_batches, args.batch)
            res[f"{name}_train_s"] = time.time() - t0
            print(f"seed {seed} {name}: val loss {res[name]:.4f} ({res[f'{name}_train_s']:.0f} s)", flush=True)
        for b in budgets:
            res["pruned"][b] = pruned_loss(models[True], batches, b, args.chunk)
            res["window"][b] = window_loss(models[False], batches, b)
            print(f"seed {seed} budget {b}: selective pruned {res['pruned'][b]:.4f}, "
                  f"baseline window {res['window'][b]:.4f}", flush=True)
        res["params"] = models[True].num_params()
        per_seed.append(res)

    mean = lambda xs: statistics.mean(xs)  # noqa: E731
    spread = lambda xs: (max(xs) - min(xs)) if len(xs) > 1 else 0.0  # noqa: E731
    result = {
        "context": args.context,
        "baseline_val_loss": mean([r["baseline"] for r in per_seed]),
        "selective_val_loss": mean([r["selective"] for r in per_seed]),
        "pruned_val_loss": {str(b): mean([r["pruned"][b] for r in per_seed]) for b in budgets},
        "window_val_loss": {str(b): mean([r["window"][b] for r in per_seed]) for b in budgets},
        "spread": {"baseline": spread([r["baseline"] for r in per_seed]),
                   "selective": spread([r["selective"] for r in per_seed])},
        "seeds": seeds,
        "steps": args.steps,
        "params": per_seed[0]["params"],
        "batch": args.batch,
        "data": counts,
        "per_seed": [{k: (v if not isinstance(v, dict) else {str(b): x for b, x in v.items()})
                      for k, v in r.items()} for r in per_seed],
        "wall_s": time.time() - t_start,
        "machine": common.machine_name("cpu"),
        "commit": common.git_commit(),
    }
    rows = [{"budget": b, "fraction": f"N/{args.context // b}",
             "selective_pruned": result["pruned_val_loss"][str(b)],
             "pruned_vs_unpruned_%": 100 * (result["pruned_val_loss"][str(b)] / result["selective_val_loss"] - 1),
             "baseline_window": result["window_val_loss"][str(b)]} for b in budgets]
    stem = common.write_results(args.out, f"quality_ctx{args.context}", "cpu",
                                {k: result[k] for k in ("context", "baseline_val_loss", "selective_val_loss",
                                                        "seeds", "steps", "params", "wall_s")},
                                rows, ["budget", "fraction", "selective_pruned", "pruned_vs_unpruned_%",
                                       "baseline_window"])
    with open(stem + ".json", "w") as f:  # the flat schema, plus the table rows
        json.dump(dict(result, rows=rows), f, indent=1)
    try:
        plot(result, stem + ".png")
    except ImportError:
        print("matplotlib not installed: no plot")
    print(common.markdown_table(rows, list(rows[0])))
    print(f"baseline {result['baseline_val_loss']:.4f}  selective {result['selective_val_loss']:.4f}  "
          f"({time.time() - t_start:.0f} s) -> {stem}.*")


if __name__ == "__main__":
    main()
