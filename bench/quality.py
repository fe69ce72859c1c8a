"""How small can selective attention's KV cache get, and how do the usual eviction methods do?

Trains three byte-level LMs of identical size, seed, data order and steps on the .py sources of
the running Python's standard library (split by file, see examples/tiny_lm.py):
  - baseline: plain causal attention;
  - selective: selective attention (selattn_ext);
  - memloss: selective attention + the paper's auxiliary memory loss
    (loss + eps * mean over layers of max_i M / N, tau = 1; examples/train_tiny_lm.py).
Then, on the validation files (each query sees at most budget + 1 tokens: budget kept + itself):
  - every model unpruned (full prefill), and the memory M of the selective ones;
  - selective and memloss through the pruned KV cache (token-by-token decode,
    selattn_ext.pruning.pruned_loss) at uniform budgets N/2 .. N/64, and at per-layer budgets
    calibrated on training windows (selattn_ext.pruning.calibrate_budgets) for several
    tolerances;
  - the baseline under the KV-eviction methods users know (bench/eviction.py): StreamingLLM
    (4 sinks + recent), H2O (heavy hitters + recent), TOVA (lowest current attention), and a
    BOS + recent sliding window, at the same uniform budgets and at the memloss model's
    calibrated memory.
reduction_at_1pct[method] = the largest memory reduction N / mean budget whose validation loss
stays within 1% of that model's unpruned loss (per seed, then averaged).
Writes JSON, markdown and a PNG (loss vs memory reduction, one line per method) into --out.

    python bench/quality.py            # defaults: context 512, 2 seeds in parallel, ~38 min on 2 idle cores (37 min CPU per seed measured)
    python bench/quality.py --quick    # smoke run: 1 seed, small models, ~2 min CPU (6 min on a busy machine)

Default sizes: 3 models x 2 seeds of 824K parameters (dim 128, 4 layers, 4 heads, byte vocab),
500 steps x 8 sequences x 512 tokens = 2.05M training tokens each; validation 8 x 8 x 512 =
32K tokens; calibration 2 x 8 x 512 training-window tokens. Measured CPU time per seed (one
process, one thread each, seeds in parallel) is in the results.
"""

from __future__ import annotations

import argparse
import datetime as _dt
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
import eviction  # noqa: E402
from tiny_lm import VOCAB, TinyLM, TinyLMConfig, load_stdlib_bytes, windows  # noqa: E402
from train_tiny_lm import evaluate, train  # noqa: E402

import selattn_ext  # noqa: E402
from selattn_ext import pruning  # noqa: E402

EVICTION = ("streaming", "h2o", "tova")
METHODS = ("selective", "selective_calibrated", "memloss", "memloss_calibrated", "window") + EVICTION
LABELS = {
    "selective": "selective, uniform budget",
    "selective_calibrated": "selective, calibrated per-layer budgets",
    "memloss": "selective + memory loss, uniform budget",
    "memloss_calibrated": "selective + memory loss, calibrated budgets",
    "window": "baseline, BOS + sliding window",
    "streaming": "baseline, StreamingLLM (4 sinks + recent)",
    "h2o": "baseline, H2O (heavy hitters + recent)",
    "tova": "baseline, TOVA",
}
# Which unpruned model each method is compared with.
OWNER = {"selective": "selective", "selective_calibrated": "selective", "memloss": "memloss",
         "memloss_calibrated": "memloss", "window": "baseline", "streaming": "baseline",
         "h2o": "baseline", "tova": "baseline"}


def val_batches(data: torch.Tensor, context: int, num: int, batch: int):
    starts = torch.linspace(0, len(data) - context - 1, num * batch).long()
    return [windows(data, context, starts[i:i + batch]) for i in range(0, num * batch, batch)]


def calib_batches(data: torch.Tensor, context: int, num: int, batch: int):
    """Fixed random training windows (never the validation files)."""
    gen = torch.Generator().manual_seed(12345)
    starts = torch.randint(0, len(data) - context - 1, (num * batch,), generator=gen)
    return [windows(data, context, starts[i:i + batch]) for i in range(0, num * batch, batch)]


@torch.no_grad()
def window_loss(model: TinyLM, batches, budget: int) -> float:
    """Baseline model where query i sees BOS and tokens i-budget+1 .. i (budget + 1 at most)."""
    model.eval()
    losses = []
    for inputs, targets in batches:
        n = inputs.shape[1]
        allowed = eviction.streaming_mask(n, budget, sinks=1)
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


@torch.no_grad()
def memory_stats(model: TinyLM, batches) -> Dict[str, object]:
    """The paper's memory M (tau = 1) on these batches: per layer the mean over sequences of
    max_i M (tokens), and their mean over layers (what the memory loss minimises, times N)."""
    model.eval()
    attns = [blk.attn for blk in model.blocks]
    saved = [a.memory_tau for a in attns]
    per_layer = [[] for _ in attns]
    try:
        for a in attns:
            a.memory_tau = 1.0
        for inputs, _ in batches:
            model(inputs)
            for i, a in enumerate(attns):
                per_layer[i].append(a.last_memory.amax(dim=-1).mean().item())
    finally:
        for a, tau in zip(attns, saved):
            a.memory_tau = tau
            a.last_memory = None
    layers = [statistics.mean(x) for x in per_layer]
    return {"max_M_per_layer": layers, "max_M_mean": statistics.mean(layers)}


def reduction_at(points: List[Dict], unpruned: float, tolerance: float = 0.01) -> float:
    """Largest reduction among points whose loss is within tolerance of unpruned (1.0 if none)."""
    ok = [p["reduction"] for p in points if p["loss"] <= unpruned * (1 + tolerance)]
    return max(ok + [1.0])


def plot(result: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"selective": "o-", "selective_calibrated": "o--", "memloss": "D-",
              "memloss_calibrated": "D--", "window": "x:", "streaming": "s-", "h2o": "^-",
              "tova": "v-"}
    for method, curve in result["curves"].items():
        pts = sorted(curve["points"], key=lambda p: p["reduction"])
        xs = [p["reduction"] for p in pts]
        axes[0].plot(xs, [p["loss"] for p in pts], styles[method], label=LABELS[method])
        axes[1].plot(xs, [p["increase_%"] for p in pts], styles[method], label=LABELS[method])
    for name, color in (("baseline", "C4"), ("selective", "C0"), ("memloss", "C2")):
        axes[0].axhline(result[f"{name}_val_loss"], color=color, ls=":", lw=0.8)
    axes[1].axhline(1.0, color="k", ls=":", lw=0.8)
    axes[1].set_yscale("symlog", linthresh=1.0)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"attention memory reduction (N / mean budget, N = {result['context']})")
    axes[0].set_ylabel("validation loss (nats/byte); dotted: unpruned models")
    axes[1].set_ylabel("loss increase over the model's unpruned loss (%)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{result['params']:,} params, {result['steps']} steps, context {result['context']}, "
                 f"seeds {result['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def seed_worker(seed: int, args, t_start: float) -> Dict:
    """One seed in its own process (seeds run in parallel, ``args.threads`` torch threads each:
    one process per core beats one process with two threads on a busy machine)."""
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f} s] {msg}", flush=True)

    train_data, val_data, _ = load_stdlib_bytes()
    vbatches = val_batches(val_data, args.context, args.val_batches, args.batch)
    cbatches = calib_batches(train_data, args.context, args.calib_batches, args.batch)
    cpu0, wall0 = time.process_time(), time.time()
    res = run_seed(seed, args, train_data, val_data, vbatches, cbatches, log)
    res["cpu_s"], res["wall_s"] = time.process_time() - cpu0, time.time() - wall0
    log(f"seed {seed} done: {res['wall_s']:.0f} s wall, {res['cpu_s']:.0f} s CPU")
    return res


def run_seed(seed: int, args, train_data, val_data, vbatches, cbatches, log) -> Dict:
    n = args.context
    budgets = [n // d for d in args.divisors]
    res: Dict = {"seed": seed, "points": {m: [] for m in METHODS}, "calibration": {}}
    models = {}
    for name in ("baseline", "selective", "memloss"):
        cfg = TinyLMConfig(dim=args.dim, layers=args.layers, heads=args.heads,
                           selective=name != "baseline", context=n,
                           memory_tau=1.0 if name == "memloss" else None)
        t0 = time.time()
        models[name] = train(cfg, args.steps, args.batch, args.lr, seed, train_data, progress=False,
                             log_every=max(1, args.steps // 4),
                             memloss_eps=args.memloss_eps if name == "memloss" else 0.0)
        res[f"{name}_train_s"] = time.time() - t0
        res[name] = evaluate(models[name], val_data, n, args.val_batches, args.batch)
        if name != "baseline":
            res[f"{name}_memory"] = memory_stats(models[name], vbatches)
        log(f"seed {seed} {name}: val loss {res[name]:.4f} ({res[f'{name}_train_s']:.0f} s)"
            + (f", mean max_i M {res[f'{name}_memory']['max_M_mean']:.1f} of {n}" if name != "baseline" else ""))
    res["params"] = models["selective"].num_params()

    def point(method: str, layer_budgets: List[int], loss: float) -> None:
        mean_b = statistics.mean(layer_budgets)
        owner = res[OWNER[method]]
        res["points"][method].append({"budgets": layer_budgets, "mean_budget": mean_b,
                                      "reduction": n / mean_b, "loss": loss,
                                      "increase_%": 100 * (loss / owner - 1)})

    t0 = time.time()
    for b in budgets:
        for name in ("selective", "memloss"):
            point(name, [b] * args.layers, pruning.pruned_loss(models[name], vbatches, b))
        point("window", [b] * args.layers, window_loss(models["baseline"], vbatches, b))
        for pol in EVICTION:
            point(pol, [b] * args.layers, eviction.eviction_loss(models["baseline"], vbatches, b, pol))
        log(f"seed {seed} budget {b}: " + ", ".join(
            f"{m} {res['points'][m][-1]['loss']:.4f}" for m in ("selective", "memloss", "window") + EVICTION))
    res["uniform_eval_s"] = time.time() - t0

    for name in ("selective", "memloss"):
        t0 = time.time()
        path = pruning.calibration_path(models[name], cbatches, tolerance=max(args.tolerances))
        cal = {"base_loss": path.base_loss, "evaluations": path.evaluations,
               "path": [{"budgets": b, "loss": l} for b, l in path.steps], "budgets": {}}
        for tol in args.tolerances:
            layer_budgets = path.budgets_for(tol)
            cal["budgets"][str(tol)] = layer_budgets
            point(f"{name}_calibrated", layer_budgets,
                  pruning.pruned_loss(models[name], vbatches, layer_budgets))
            p = res["points"][f"{name}_calibrated"][-1]
            log(f"seed {seed} {name} calibrated (tolerance {tol}): {layer_budgets} "
                f"-> {p['reduction']:.1f}x, val loss {p['loss']:.4f} ({p['increase_%']:+.2f}%)")
        cal["seconds"] = time.time() - t0
        res["calibration"][name] = cal

    # The eviction methods at the memory the memloss model's 1%-calibrated budgets use.
    target = cal["budgets"][str(0.01)] if 0.01 in args.tolerances else cal["budgets"][str(args.tolerances[0])]
    b_eq = max(1, round(statistics.mean(target)))
    res["at_memloss_calibrated"] = {"budget": b_eq, "reduction": n / b_eq}
    for pol in EVICTION:
        res["at_memloss_calibrated"][pol] = eviction.eviction_loss(models["baseline"], vbatches, b_eq, pol)
    res["at_memloss_calibrated"]["window"] = window_loss(models["baseline"], vbatches, b_eq)
    log(f"seed {seed} eviction at budget {b_eq} (memloss calibrated memory): "
        + ", ".join(f"{m} {res['at_memloss_calibrated'][m]:.4f}" for m in EVICTION + ("window",)))
    res["reduction_at_1pct"] = {m: reduction_at(res["points"][m], res[OWNER[m]]) for m in METHODS}
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=8, help="sequences per training step and per eval batch")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--memloss-eps", type=float, default=0.1,
                   help="weight of the memory loss (mean over layers of max_i M / N, tau = 1)")
    p.add_argument("--seeds", default="0,1", help="comma list; each seed trains all three models")
    p.add_argument("--divisors", default="2,4,8,16,32,64", help="uniform budgets = context / divisor")
    p.add_argument("--tolerances", default="0.0025,0.005,0.01,0.02",
                   help="calibration tolerances (relative); one search serves them all")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--calib-batches", type=int, default=2, help="training-window batches for calibration")
    p.add_argument("--jobs", type=int, default=0,
                   help="seeds run in parallel processes (default: min(seeds, CPU cores))")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (default: CPU cores // jobs)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 seed, 60 steps, dim 64, 2 layers, fewer budgets and batches")
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.dim, args.layers = "0", 60, 64, 2
        args.divisors, args.val_batches, args.calib_batches, args.tolerances = "4,16,64", 1, 1, "0.01,0.02"
    args.divisors = [int(d) for d in args.divisors.split(",")]
    args.tolerances = [float(t) for t in args.tolerances.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    cores = os.cpu_count() or 1
    args.jobs = args.jobs or min(len(seeds), cores)
    args.threads = args.threads or max(1, cores // args.jobs)
    t_start = time.time()
    _, _, counts = load_stdlib_bytes()
    print(f"data (stdlib .py files, split by path hash): {counts}; {len(seeds)} seeds, "
          f"{args.jobs} processes x {args.threads} threads", flush=True)
    if args.jobs == 1:
        per_seed = [seed_worker(s, args, t_start) for s in seeds]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_seed = list(pool.map(seed_worker, seeds, [args] * len(seeds), [t_start] * len(seeds)))

    mean = statistics.mean
    n = args.context
    budgets = [n // d for d in args.divisors]
    curves: Dict[str, Dict] = {}
    for m in METHODS:
        k = len(per_seed[0]["points"][m])
        pts = []
        for i in range(k):
            group = [r["points"][m][i] for r in per_seed]
            pts.append({"mean_budget": mean(g["mean_budget"] for g in group),
                        "reduction": mean(g["reduction"] for g in group),
                        "loss": mean(g["loss"] for g in group),
                        "increase_%": mean(g["increase_%"] for g in group),
                        "per_seed": group})
        curves[m] = {"label": LABELS[m], "compared_with": OWNER[m], "points": pts}
    result = {
        "context": n,
        "baseline_val_loss": mean(r["baseline"] for r in per_seed),
        "selective_val_loss": mean(r["selective"] for r in per_seed),
        "memloss_val_loss": mean(r["memloss"] for r in per_seed),
        "pruned_val_loss": {str(b): curves["selective"]["points"][i]["loss"] for i, b in enumerate(budgets)},
        "memloss_pruned_val_loss": {str(b): curves["memloss"]["points"][i]["loss"] for i, b in enumerate(budgets)},
        "window_val_loss": {str(b): curves["window"]["points"][i]["loss"] for i, b in enumerate(budgets)},
        "eviction_val_loss": {pol: {str(b): curves[pol]["points"][i]["loss"] for i, b in enumerate(budgets)}
                              for pol in EVICTION},
        "calibrated_budgets": {name: {str(t): [r["calibration"][name]["budgets"][str(t)] for r in per_seed]
                                      for t in args.tolerances} for name in ("selective", "memloss")},
        "reduction_at_1pct": {m: mean(r["reduction_at_1pct"][m] for r in per_seed) for m in METHODS},
        "reduction_at_1pct_per_seed": {m: [r["reduction_at_1pct"][m] for r in per_seed] for m in METHODS},
        "memory_M": {name: mean(r[f"{name}_memory"]["max_M_mean"] for r in per_seed)
                     for name in ("selective", "memloss")},
        "at_memloss_calibrated": [r["at_memloss_calibrated"] for r in per_seed],
        "curves": curves,
        "seeds": seeds,
        "steps": args.steps,
        "params": per_seed[0]["params"],
        "model": {"dim": args.dim, "layers": args.layers, "heads": args.heads, "vocab": VOCAB},
        "batch": args.batch,
        "train_tokens_per_model": args.steps * args.batch * n,
        "val_tokens": args.val_batches * args.batch * n,
        "calib_tokens": args.calib_batches * args.batch * n,
        "memloss_eps": args.memloss_eps,
        "memory_tau": 1.0,
        "tolerances": args.tolerances,
        "quick": args.quick,
        "data": counts,
        "per_seed": per_seed,
        "wall_s": time.time() - t_start,
        "cpu_s_per_seed": [r["cpu_s"] for r in per_seed],
        "jobs": args.jobs,
        "threads_per_job": args.threads,
        "machine": common.machine_name("cpu"),
        "date": _dt.date.today().isoformat(),
        "commit": common.git_commit(),
        "load_average": os.getloadavg(),
    }
    rows = []
    for m in METHODS:
        for pt in curves[m]["points"]:
            rows.append({"method": m, "mean_budget": round(pt["mean_budget"], 1),
                         "reduction": round(pt["reduction"], 2), "val_loss": pt["loss"],
                         "increase_%": pt["increase_%"]})
    summary = [{"method": m, "compared_with": OWNER[m],
                "unpruned": result[f"{OWNER[m]}_val_loss"],
                "reduction_at_1pct": result["reduction_at_1pct"][m],
                "per_seed": " / ".join(f"{x:.1f}" for x in result["reduction_at_1pct_per_seed"][m])}
               for m in METHODS]
    name = f"quality_ctx{n}" + ("_quick" if args.quick else "")
    notes = notes_text(result, args)
    stem = common.write_results(args.out, name, "cpu",
                                {k: result[k] for k in ("context", "baseline_val_loss", "selective_val_loss",
                                                        "memloss_val_loss", "seeds", "steps", "params",
                                                        "batch", "train_tokens_per_model", "val_tokens",
                                                        "memloss_eps", "wall_s")},
                                rows, ["method", "mean_budget", "reduction", "val_loss", "increase_%"],
                                notes=common.markdown_table(summary, list(summary[0])) + "\n\n" + notes)
    with open(stem + ".json", "w") as f:  # the flat schema, plus the table rows
        json.dump(dict(result, rows=rows), f, indent=1)
    try:
        plot(result, stem + ".png")
    except ImportError:
        print("matplotlib not installed: no plot")
    print(common.markdown_table(summary, list(summary[0])))
    print(notes)
    print(f"[{time.time() - t_start:6.0f} s] -> {stem}.*", flush=True)


def notes_text(result: Dict, args) -> str:
    lines = [f"Model: {result['params']:,} params (dim {args.dim}, {args.layers} layers, {args.heads} heads), "
             f"{args.steps} steps x {args.batch} x {args.context} tokens = {result['train_tokens_per_model']:,} "
             f"training tokens per model; validation {result['val_tokens']:,} tokens; calibration "
             f"{result['calib_tokens']:,} training-window tokens; memory loss eps = {args.memloss_eps}, tau = 1.",
             f"Memory M (mean over layers of max_i M, tokens of {args.context}): selective "
             f"{result['memory_M']['selective']:.1f}, memloss {result['memory_M']['memloss']:.1f}."]
    for name in ("selective", "memloss"):
        for t, per in result["calibrated_budgets"][name].items():
            lines.append(f"Calibrated budgets, {name}, tolerance {t}: " + "; ".join(str(b) for b in per))
    for seed, r in zip(result["seeds"], result["at_memloss_calibrated"]):
        lines.append(f"Seed {seed}: eviction at the memloss model's 1%-calibrated memory (budget {r['budget']}, "
                     f"{r['reduction']:.1f}x): " + ", ".join(f"{m} {r[m]:.4f}" for m in EVICTION + ("window",)))
    lines.append(f"Wall time {result['wall_s']:.0f} s ({result['jobs']} processes x {result['threads_per_job']} "
                 f"threads); CPU time per seed {', '.join(f'{c:.0f}' for c in result['cpu_s_per_seed'])} s "
                 f"(about the wall time on an idle machine, seeds in parallel); load average at the end "
                 f"{tuple(round(x, 1) for x in result['load_average'])}.")
    return "\n".join("- " + line for line in lines)


if __name__ == "__main__":
    main()
