"""Shared benchmark plumbing: machine naming, alternating timed runs, result files.

Every benchmark times our op and its baselines in one process, alternating calls so drift
(thermal, other load) hits all of them alike, and reports medians and ratios. Results are
written as JSON plus a markdown table named with the machine, the date and the git commit.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except Exception:  # not a git checkout (e.g. an sdist)
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: str) -> str:
    """Human-readable name of what ran the benchmark: GPU name on CUDA, CPU model and core count otherwise."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} x{torch.get_num_threads()} threads"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_alternating(fns: Dict[str, Callable[[], object]], device: str, reps: int,
                     warmup: int = 1) -> Dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated by one call of fn, above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def markdown_table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str, name: str, device: str, meta: Dict[str, object],
                  rows: List[Dict[str, object]], columns: Sequence[str],
                  notes: Optional[str] = None) -> str:
    """Writes <name>_<machine>_<date>_<commit>.{json,md} into out_dir; returns the stem."""
    os.makedirs(out_dir, exist_ok=True)
    machine = machine_name(device)
    date = _dt.date.today().isoformat()
    commit = git_commit()
    stem = os.path.join(out_dir, f"{name}_{slug(machine)}_{date}_{commit}")
    meta = dict(meta, machine=machine, date=date, commit=commit, torch=torch.__version__,
                device=device)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# {name}: {machine}, {date}, commit {commit}\n\n")
        f.write(", ".join(f"{k}={v}" for k, v in meta.items() if k not in ("machine", "date", "commit")))
        f.write("\n\n" + markdown_table(rows, columns) + "\n")
        if notes:
            f.write("\n" + notes.strip() + "\n")
    return stem
