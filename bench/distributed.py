"""Scaling of the tiny LM's training over CPU processes (gloo): tokens/s for 1 vs 2 processes
per parallel mode, and the bytes the attention layers communicate per layer and step.

    python bench/distributed.py              # ~5-10 min on 2 loaded cores

Configurations (each a fresh set of processes, fp32, one intra-op thread per process):
  1 process x 1 thread, 1 process x 2 threads (the fair single-process baseline on 2 cores),
  then 2 processes x 1 thread for fsdp, ddp, tp, cp (examples/distributed_lm.py), plus
  tp-plain: the same TP plan with plain causal attention (selective=False), the baseline for
  the selection head's extra traffic.
Reported per configuration: median step time and tokens/s (global tokens per step / step time),
and, per attention layer and step, the payload bytes of every collective: ours counted by
selattn_ext.distributed.TRAFFIC from the tensors exchanged; DTensor's all-reduces counted with
CommDebugMode (calls) times their tensor size. Plain attention's all-gather context parallelism
(torchtitan) is not implemented here; its traffic (k and v gathered forward, reduce-scattered
backward) is the k/v part of ours, listed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

CONFIGS = [("single", 1, 1), ("single", 1, 2), ("fsdp", 2, 1), ("ddp", 2, 1), ("tp", 2, 1),
           ("tp-plain", 2, 1), ("cp", 2, 1)]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import selattn_ext.distributed as sd
    from distributed_lm import finish_grads, local_batch, loss_fn, parallelize
    from tiny_lm import TinyLM, TinyLMConfig

    torch.set_num_threads(args.threads)
    mode = args.mode
    distributed = mode != "single"
    if distributed:
        dist.init_process_group("gloo")
    cfg = TinyLMConfig(dim=args.dim, layers=args.layers, heads=args.heads, context=args.context,
                       selective=mode != "tp-plain")
    torch.manual_seed(0)
    model = TinyLM(cfg)
    if distributed:
        model = parallelize(model, "tp" if mode == "tp-plain" else mode, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step():
        tokens = torch.randint(0, 256, (args.batch, args.context + 1), generator=gen)
        tokens[:, 0] = 256
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        if distributed:
            inp, tgt = local_batch(inp, tgt, "tp" if mode == "tp-plain" else mode)
        loss = loss_fn(model, inp, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if distributed:
            finish_grads(model, mode)
        opt.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        if distributed:
            dist.barrier()
        times.append(time.perf_counter() - t0)

    traffic, dtensor_calls = {}, {}
    if distributed:
        from torch.distributed.tensor.debug import CommDebugMode

        sd.TRAFFIC.clear()
        with CommDebugMode() as comm:
            step()
        traffic = dict(sd.TRAFFIC)
        dtensor_calls = {str(k): v for k, v in comm.get_comm_counts().items()}
    if not distributed or dist.get_rank() == 0:
        med = statistics.median(times)
        with open(args.out, "w") as f:
            json.dump({"step_s": med, "times": times, "traffic": traffic,
                       "dtensor_calls": dtensor_calls}, f)
    if distributed:
        dist.destroy_process_group()


def launch(mode: str, world: int, threads: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode,
               "--threads", str(threads), "--out", out]
        for k in ("dim", "layers", "heads", "context", "batch", "steps", "warmup"):
            cmd += [f"--{k}", str(getattr(args, k))]
        procs = []
        for r in range(world):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
            procs.append(subprocess.Popen(cmd, env=env))
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError(f"{mode} x {world} failed")
        with open(out) as f:
            return json.load(f)


def attention_bytes(mode: str, res: dict, args) -> dict:
    """Payload bytes per attention layer and step, by collective."""
    b, n, e, h = args.batch, args.context, args.dim, args.heads
    d, elt, layers = e // h, 4, args.layers
    ours = {k: v / layers for k, v in res["traffic"].items() if "as all_reduce" not in k}
    if mode in ("tp", "tp-plain"):
        # out_proj's output all-reduce (forward) and qkv's input-gradient all-reduce (backward)
        allreduce = 2 * b * n * e * elt
        calls = sum(v for k, v in res["dtensor_calls"].items() if "all_reduce" in k)
        sel = ours.get("broadcast", 0) + ours.get("reduce", 0)
        return {"plain_attention_B": allreduce, "selection_extra_B": sel,
                "total_B": allreduce + sel, "dtensor_all_reduce_calls_per_step": calls}
    if mode == "cp":
        kv = 2 * b * n * h * d * elt * 2  # k and v: all-gather forward + reduce-scatter backward
        total = ours.get("all_gather", 0) + ours.get("reduce_scatter", 0)
        return {"plain_attention_B": kv, "selection_extra_B": total - kv, "total_B": total}
    return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="single")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import common

    load_before = os.getloadavg()
    # Rounds over all configurations (not all rounds of one, then the next) so that changes in
    # the machine's load hit every configuration alike; the step times of all rounds are pooled.
    results = {c: [] for c in CONFIGS}
    for rnd in range(args.rounds):
        for config in CONFIGS:
            t0 = time.time()
            res = launch(*config, args)
            results[config].append(res)
            print(f"round {rnd}: {config}: median step {res['step_s']:.3f} s "
                  f"[{time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f}]", flush=True)
    rows = []
    for (mode, world, threads), runs in results.items():
        times = [t for r in runs for t in r["times"]]
        step_s = statistics.median(times)
        row = {"mode": mode, "processes": world, "threads_each": threads, "step_s": step_s,
               "tokens_per_s": args.batch * args.context / step_s,
               "round_medians_s": [r["step_s"] for r in runs]}
        row.update(attention_bytes(mode, runs[0], args))
        row["traffic_per_step_B"] = runs[0]["traffic"]
        rows.append(row)
        print(row, flush=True)
    base = next(r for r in rows if r["mode"] == "single" and r["threads_each"] == 2)
    for r in rows:
        r["speedup_vs_1proc_2thr"] = r["tokens_per_s"] / base["tokens_per_s"]
    load_after = os.getloadavg()
    meta = {k: getattr(args, k) for k in ("dim", "layers", "heads", "context", "batch", "steps",
                                          "warmup", "rounds")}
    meta.update(dtype="float32", backend="gloo", load_before=load_before, load_after=load_after,
                cores=os.cpu_count())
    notes = (f"Machine load (1/5/15-min load average) before: {load_before}, after: "
             f"{load_after}, on {os.cpu_count()} cores shared with other jobs: the timings are "
             "noisy and the 2-process runs compete with whatever else ran. Bytes are payloads "
             "per attention layer and training step (forward + backward), fp32: TP: plain "
             "attention's two B N E all-reduces vs the selection head's broadcast + reduce of "
             "(2, B, N, D); CP: plain all-gather CP's k/v gathers + reduce-scatters vs ours, "
             "which adds k_sel and the column sums of S (W x B x N). On the wire (ring "
             "algorithms) an all-reduce moves 2 (W - 1) / W of its payload per rank, the others "
             "(W - 1) / W.")
    cols = ["mode", "processes", "threads_each", "step_s", "tokens_per_s",
            "speedup_vs_1proc_2thr", "plain_attention_B", "selection_extra_B", "total_B"]
    stem = common.write_results(args.out_dir, "distributed", "cpu", meta, rows, cols, notes)
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
