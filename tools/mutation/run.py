"""Mutation testing: plant each bug of tools/mutation/mutations.toml in a scratch copy of the
tree, rebuild (CPU only) when a compiled file changed, run that mutation's tests, and report
whether they caught it. Every listed mutation must be caught.

    python tools/mutation/run.py                       # all mutations, report in bench/results/
    python tools/mutation/run.py --only decode-tau-ties-evicted --only cache-decode-drops-scale
    python tools/mutation/run.py --list                # ids, files, and whether each text is found
    python tools/mutation/run.py --report /tmp/mut.md  # report elsewhere (+ .json next to it)

Run it with the Python that has torch, pytest, hypothesis and transformers (the project venv).
The working tree is never modified: it is copied (git's tracked and untracked-but-not-ignored
files) into a scratch directory (``--scratch``, default under the system temp dir), which keeps
its build between runs so that only the translation units a mutation touches recompile
(``setup.py build_ext --inplace --force`` with SELATTN_FORCE_CPU=1: setuptools always hands
over to ninja, which recompiles by its header dependencies). Tests run in the scratch copy with
it first on PYTHONPATH; the run checks that ``selattn_ext`` resolves there.

Exit status: 0 when every selected mutation is caught and the unmutated baseline passes; 1 when
a mutation survives; 2 on an error (a mutation's original text not found or ambiguous, a
mutated file that does not compile, a test selection that collects nothing, a failing
baseline). Errors are reported, never counted as caught, so the list cannot rot silently.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIST = Path(__file__).resolve().parent / "mutations.toml"
# Files the CPU-only build compiles (directly or as headers). Everything under csrc/cuda is
# left to an entry's own command (e.g. a CPU execution target of the CUDA kernels).
COMPILED_SUFFIXES = (".cpp", ".cc", ".h", ".hpp")


@dataclass
class Mutation:
    """One planted bug: ``original`` (exactly once in ``file``) becomes ``replacement``.

    ``tests`` are pytest arguments (node ids, files, ``-k`` expressions) run in the scratch
    copy; or ``command`` is an argv list run there instead (``{python}`` is replaced by this
    interpreter), e.g. a CPU emulation of a CUDA kernel. ``rebuild`` defaults to whether the
    file is part of the CPU-only extension build."""

    id: str
    file: str
    original: str
    replacement: str
    why: str
    tests: List[str] = field(default_factory=list)
    command: List[str] = field(default_factory=list)
    rebuild: Optional[bool] = None
    timeout_s: int = 900

    @property
    def needs_rebuild(self) -> bool:
        if self.rebuild is not None:
            return self.rebuild
        return (self.file.startswith("csrc/") and not self.file.startswith("csrc/cuda/")
                and self.file.endswith(COMPILED_SUFFIXES))


@dataclass
class Outcome:
    id: str
    file: str
    status: str  # caught | survived | error
    seconds: float
    detail: str
    build_seconds: float = 0.0


def load_mutations(path: Path) -> List[Mutation]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    entries = data.get("mutation", [])
    known = set(Mutation.__dataclass_fields__)
    muts, seen = [], set()
    for i, e in enumerate(entries):
        unknown = set(e) - known
        if unknown:
            raise SystemExit(f"{path}: entry {i} ({e.get('id')}): unknown keys {sorted(unknown)}")
        for key in ("id", "file", "original", "replacement", "why"):
            if not isinstance(e.get(key), str) or not e[key]:
                raise SystemExit(f"{path}: entry {i} ({e.get('id')}): `{key}` must be a "
                                 f"non-empty string")
        if bool(e.get("tests")) == bool(e.get("command")):
            raise SystemExit(f"{path}: {e['id']}: give exactly one of `tests` and `command`")
        if e["original"] == e["replacement"]:
            raise SystemExit(f"{path}: {e['id']}: replacement equals the original")
        if e["id"] in seen:
            raise SystemExit(f"{path}: duplicate id {e['id']}")
        seen.add(e["id"])
        muts.append(Mutation(**e))
    return muts


# ---------------------------------------------------------------------------------------------
# Scratch copy
# ---------------------------------------------------------------------------------------------

def source_files(root: Path) -> List[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout
    return sorted(p for p in out.decode().split("\0") if p and (root / p).is_file())


def sync_scratch(root: Path, scratch: Path) -> int:
    """Mirrors the working tree's sources into ``scratch``; returns how many files changed.

    Only files whose bytes differ are rewritten (with a fresh mtime, so ninja rebuilds what
    depends on them and nothing else); files that left the tree since the last sync are deleted
    (setup.py globs csrc/, so a stale source would be compiled)."""
    scratch.mkdir(parents=True, exist_ok=True)
    manifest = scratch / ".mutation-manifest"
    old = set(manifest.read_text().split("\n")) - {""} if manifest.exists() else set()
    files = source_files(root)
    changed = 0
    for rel in files:
        src, dst = root / rel, scratch / rel
        data = src.read_bytes()
        if dst.exists() and dst.read_bytes() == data:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        shutil.copymode(src, dst)
        changed += 1
    for rel in old - set(files):
        (scratch / rel).unlink(missing_ok=True)
        changed += 1
    manifest.write_text("\n".join(files) + "\n")
    return changed


def default_scratch(root: Path) -> Path:
    tag = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"selattn-mutation-{tag}"


class Scratch:
    def __init__(self, path: Path, jobs: int, log):
        self.path, self.jobs, self.log = path, jobs, log
        self.env = dict(os.environ, SELATTN_FORCE_CPU="1", MAX_JOBS=str(jobs),
                        PYTHONPATH=os.pathsep.join(
                            [str(path), str(path / "python_tests"),
                             os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                        PYTHONDONTWRITEBYTECODE="1")
        self.stale = True

    def build(self) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--force"]
        proc = subprocess.run(cmd, cwd=self.path, env=self.env, capture_output=True, text=True)
        if proc.returncode == 0:
            self.stale = False
        return proc

    def check_import(self) -> str:
        proc = subprocess.run([sys.executable, "-c",
                               "import selattn_ext, selattn_ext._C; print(selattn_ext.__file__)"],
                              cwd=self.path, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"cannot import selattn_ext from the scratch copy:\n{proc.stderr}")
        where = Path(proc.stdout.strip()).resolve()
        if self.path.resolve() not in where.parents:
            raise SystemExit(f"selattn_ext resolves to {where}, not into the scratch copy "
                             f"{self.path}: the tests would not see the mutations")
        return str(where)

    def run(self, argv: Sequence[str], timeout: int) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), cwd=self.path, env=self.env, capture_output=True,
                              text=True, timeout=timeout)


def pytest_argv(tests: Sequence[str]) -> List[str]:
    # -x: the first failure is enough; no cache dir or bytecode written into the scratch tree.
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
            "--no-header", "-rfE", *tests]


def first_failure(output: str) -> str:
    for pat in (r"^FAILED (\S+)", r"^ERROR (\S+)", r"^E\s+(.{0,160})"):
        m = re.search(pat, output, flags=re.M)
        if m:
            return m.group(1)
    tail = [line for line in output.strip().splitlines() if line.strip()]
    return tail[-1][:160] if tail else ""


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def locate(scratch: Path, m: Mutation) -> Optional[str]:
    """None when the original text occurs exactly once, else the error."""
    path = scratch / m.file
    if not path.exists():
        return f"file not found: {m.file}"
    count = path.read_text().count(m.original)
    if count == 0:
        return "mutation text not found"
    if count > 1:
        return f"mutation text ambiguous ({count} occurrences)"
    return None


def run_one(sc: Scratch, m: Mutation, log) -> Outcome:
    start = time.monotonic()
    path = sc.path / m.file
    error = locate(sc.path, m)
    if error:
        return Outcome(m.id, m.file, "error", 0.0, error)
    original = path.read_text()
    build_s = 0.0
    try:
        path.write_text(original.replace(m.original, m.replacement, 1))
        if m.needs_rebuild or sc.stale:
            t0 = time.monotonic()
            proc = sc.build()
            build_s = time.monotonic() - t0
            if proc.returncode != 0:
                sc.stale = True
                msg = [line for line in proc.stderr.splitlines() if "error" in line]
                return Outcome(m.id, m.file, "error", time.monotonic() - start,
                               "mutated file does not compile: " + (msg[0] if msg else "")[:200],
                               build_s)
        argv = ([a.replace("{python}", sys.executable) for a in m.command] if m.command
                else pytest_argv(m.tests))
        try:
            proc = sc.run(argv, m.timeout_s)
        except subprocess.TimeoutExpired:
            return Outcome(m.id, m.file, "caught", time.monotonic() - start,
                           f"timed out after {m.timeout_s} s", build_s)
        out = proc.stdout + proc.stderr
        if m.command:
            status = "caught" if proc.returncode != 0 else "survived"
            detail = first_failure(out) if proc.returncode else "command passed"
        elif proc.returncode == 1:
            status, detail = "caught", first_failure(out)
        elif proc.returncode == 0:
            status, detail = "survived", "tests passed: " + (out.strip().splitlines() or [""])[-1]
        else:  # 2 interrupted / collection error, 4 usage, 5 nothing collected
            status, detail = "error", f"pytest exit {proc.returncode}: {first_failure(out)}"
        return Outcome(m.id, m.file, status, time.monotonic() - start, detail, build_s)
    finally:
        path.write_text(original)
        if m.needs_rebuild:
            sc.stale = True  # the restored file is newer than its object: rebuilt when needed


def run_baseline(sc: Scratch, muts: Sequence[Mutation], log) -> Outcome:
    """The unmutated scratch copy must pass every selection (else "caught" would mean nothing)."""
    start = time.monotonic()
    failures = []
    # -k expressions belong to their own selection, so pytest runs once per distinct selection
    # that uses one, and once for all the plain node ids / files together.
    plain = [t for m in muts if m.tests and "-k" not in m.tests for t in m.tests]
    plain = list(dict.fromkeys(plain))
    groups = ([plain] if plain else []) + [m.tests for m in muts if m.tests and "-k" in m.tests]
    seen_groups = []
    for g in groups:
        if g in seen_groups:
            continue
        seen_groups.append(g)
        proc = sc.run(pytest_argv(g), 3600)
        if proc.returncode != 0:
            failures.append(f"{' '.join(g)}: {first_failure(proc.stdout + proc.stderr)}")
    for m in muts:
        if m.command:
            argv = [a.replace("{python}", sys.executable) for a in m.command]
            proc = sc.run(argv, m.timeout_s)
            if proc.returncode != 0:
                failures.append(f"{' '.join(argv)}: exit {proc.returncode}")
    return Outcome("(baseline)", "-", "passed" if not failures else "error",
                   time.monotonic() - start, "; ".join(failures) or f"{len(seen_groups)} pytest runs")


def ordered(muts: Sequence[Mutation]) -> List[Mutation]:
    """Python-only mutations first (on the baseline build), then compiled ones grouped by file,
    so consecutive mutations of one file recompile one translation unit once each."""
    first_seen: Dict[str, int] = {}
    for i, m in enumerate(muts):
        first_seen.setdefault(m.file, i)
    return sorted(muts, key=lambda m: (m.needs_rebuild, first_seen[m.file] if m.needs_rebuild else 0))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def git_commit(root: Path) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_report(path: Path, meta: dict, baseline: Optional[Outcome], outcomes: List[Outcome],
                 muts: Dict[str, Mutation]) -> None:
    caught = sum(o.status == "caught" for o in outcomes)
    lines = [f"# Mutation testing: {caught} of {len(outcomes)} caught", "",
             f"- machine: {meta['machine']} (load average at start {meta['load_start']}, "
             f"at end {meta['load_end']})",
             f"- commit: {meta['commit']}, date (UTC): {meta['date']}",
             f"- command: `{meta['command']}`",
             f"- wall time: {meta['wall_s'] / 60:.1f} min (initial build "
             f"{meta['initial_build_s']:.0f} s, baseline tests "
             f"{baseline.seconds if baseline else 0:.0f} s, mutations "
             f"{sum(o.seconds for o in outcomes):.0f} s of which rebuilds "
             f"{sum(o.build_seconds for o in outcomes):.0f} s)",
             f"- baseline (unmutated): {baseline.status + ' - ' + baseline.detail if baseline else 'skipped'}",
             "", "| id | file | result | s (build) | evidence |", "|---|---|---|---|---|"]
    for o in outcomes:
        ev = o.detail.replace("|", "\\|")
        lines.append(f"| {o.id} | {o.file} | {o.status} | {o.seconds:.0f} ({o.build_seconds:.0f}) "
                     f"| {ev} |")
    lines += ["", "## What each mutation plants", ""]
    for o in outcomes:
        m = muts[o.id]
        sel = " ".join(m.tests) if m.tests else " ".join(m.command)
        lines.append(f"- **{m.id}** ({m.file}): {m.why} Tests: `{sel}`")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    payload = dict(meta, baseline=baseline.__dict__ if baseline else None,
                   outcomes=[o.__dict__ for o in outcomes])
    path.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="ID",
                    help="run only this mutation (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutations and check their text")
    ap.add_argument("--mutations", type=Path, default=DEFAULT_LIST, help="the mutation list")
    ap.add_argument("--report", type=Path, help="markdown report path (a .json is written next "
                    "to it); default bench/results/mutation_<machine>_<date>_<commit>.md")
    ap.add_argument("--scratch", type=Path, help="scratch copy (kept between runs for its build)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")),
                    help="parallel compile jobs (default $MAX_JOBS or 2)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the selected tests on the unmutated copy first")
    args = ap.parse_args(argv)

    muts = load_mutations(args.mutations)
    by_id = {m.id: m for m in muts}
    for i in args.only:
        if i not in by_id:
            raise SystemExit(f"--only {i}: no such mutation (see --list)")
    if args.only:
        muts = [by_id[i] for i in args.only]

    if args.list:
        bad = 0
        for m in muts:
            err = locate(ROOT, m)
            bad += err is not None
            print(f"{m.id:40s} {m.file:45s} {'rebuild' if m.needs_rebuild else '       '} "
                  f"{err or 'ok'}")
        return 2 if bad else 0

    def log(msg: str) -> None:
        print(f"[{dt.datetime.utcnow():%H:%M:%S}] {msg}", flush=True)

    t_start = time.monotonic()
    load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    scratch = Scratch(args.scratch or default_scratch(ROOT), args.jobs, log)
    changed = sync_scratch(ROOT, scratch.path)
    log(f"scratch copy {scratch.path}: {changed} files updated; building (CPU only)")
    t0 = time.monotonic()
    proc = scratch.build()
    initial_build_s = time.monotonic() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit("the unmutated scratch copy does not build")
    log(f"built in {initial_build_s:.0f} s; selattn_ext from {scratch.check_import()}")

    errors = [(m, locate(scratch.path, m)) for m in muts]
    outcomes: List[Outcome] = [Outcome(m.id, m.file, "error", 0.0, e) for m, e in errors if e]
    runnable = [m for m, e in errors if not e]

    baseline = None
    if not args.no_baseline and runnable:
        log(f"baseline: the {len(runnable)} selections on the unmutated copy")
        baseline = run_baseline(scratch, runnable, log)
        log(f"baseline {baseline.status} in {baseline.seconds:.0f} s {baseline.detail}")

    for m in ordered(runnable):
        log(f"{m.id} ({m.file}) ...")
        o = run_one(scratch, m, log)
        outcomes.append(o)
        log(f"  -> {o.status.upper()} in {o.seconds:.0f} s (build {o.build_seconds:.0f} s): "
            f"{o.detail}")

    if scratch.stale:
        # Leave the scratch build matching its (restored) sources: a test run there by hand
        # would otherwise load the last mutated extension.
        log("rebuilding the scratch copy from the unmutated sources")
        if scratch.build().returncode != 0:
            log("warning: the restored scratch copy did not rebuild")

    order = {m.id: i for i, m in enumerate(load_mutations(args.mutations))}
    outcomes.sort(key=lambda o: order[o.id])
    commit = git_commit(ROOT)
    date = dt.datetime.utcnow()
    meta = dict(machine=f"{cpu_model()} x{os.cpu_count()}", commit=commit,
                date=f"{date:%Y-%m-%d %H:%M}", command=" ".join(
                    ["python tools/mutation/run.py", *sys.argv[1:]]),
                wall_s=time.monotonic() - t_start, initial_build_s=initial_build_s,
                load_start=load_start,
                load_end=" ".join(f"{x:.1f}" for x in os.getloadavg()))
    report = args.report or (ROOT / "bench" / "results" /
                             f"mutation_{slug(meta['machine'])}_{date:%Y-%m-%d}_{commit}.md")
    write_report(report, meta, baseline, outcomes, by_id)
    caught = sum(o.status == "caught" for o in outcomes)
    survived = [o.id for o in outcomes if o.status == "survived"]
    errs = [o.id for o in outcomes if o.status == "error"]
    log(f"{caught}/{len(outcomes)} caught; survived: {survived or 'none'}; errors: "
        f"{errs or 'none'}; report {report}")
    if errs or (baseline is not None and baseline.status != "passed"):
        return 2
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
