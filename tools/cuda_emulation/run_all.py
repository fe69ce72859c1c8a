"""The full emulation matrix: every CUDA kernel on the CPU against the fp64 reference, optionally
under a sanitizer, plus the planted defects.

    python tools/cuda_emulation/run_all.py --json FILE [--sanitize address|thread] [--quick]
                                           [--defects] [--only SUBSTRING]

--only matches the case's kind and repr (e.g. "varlen", "path='tc'", "torch.float16"); given
several times, a case must match all of them (--only "prefill " --only "path='tc'").

Writes one JSON record per case and output: kernel, dtype, head_dim, shape, max_err, tol,
passed, and the number of sanitizer reports the case produced (ASan/UBSan errors or TSan
warnings in its stderr) plus the emulation runtime's own reports. With --defects, each planted
defect of emulated.DEFECTS is built and must be caught (a failed comparison, a runtime report
or a sanitizer report). Exit status 1 if anything failed.

A sanitizer run re-executes this script with the sanitizer runtime preloaded (the library is
loaded into Python with ctypes). TSan runs are ~15x slower: --quick keeps them short.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

SAN_ENV = {
    "address": {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=0:detect_stack_use_after_return=0:"
                                "allocator_may_return_null=1",
                "UBSAN_OPTIONS": "halt_on_error=0:print_stacktrace=1"},
    # exitcode=0: expected reports (the self-test, planted defects) must not decide the exit
    # status; run_all counts the reports of each case itself.
    "thread": {"TSAN_OPTIONS": "ignore_noninstrumented_modules=1:report_signal_unsafe=0:"
                               "halt_on_error=0:history_size=4:exitcode=0"},
}
SAN_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "WARNING: ThreadSanitizer",
               "ERROR: ThreadSanitizer")


def _reexec_with_runtime(sanitize: str):
    lib = subprocess.run(["g++", f"-print-file-name={'libasan.so' if sanitize == 'address' else 'libtsan.so'}"],
                         capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, LD_PRELOAD=lib, SELATTN_EMU_PRELOADED="1", OMP_NUM_THREADS="1",
               **SAN_ENV[sanitize])
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


class StderrCounter:
    """Counts sanitizer reports written to fd 2 while a case runs."""

    def __init__(self):
        # A named file, so a sanitizer that kills the process leaves its last words readable.
        self.path = os.path.join(tempfile.gettempdir(), f"selattn_run_all_stderr_{os.getpid()}.log")
        self.file = open(self.path, "w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        self.offset = 0

    def take(self) -> tuple:
        sys.stderr.flush()
        self.file.seek(self.offset)
        text = self.file.read().decode("utf-8", "replace")
        self.offset = self.file.tell()
        count = sum(text.count(m) for m in SAN_MARKERS)
        return count, text

    def close(self):
        # Whatever came after the last case (a sanitizer dying, say) is shown, not swallowed.
        _, rest = self.take()
        os.dup2(self.saved, 2)
        if rest.strip():
            sys.stderr.write(rest[-5000:])


def write_markdown(json_path: str) -> str:
    """A table per kernel family next to the JSON: cases, worst err/tol, sanitizer reports."""
    data = json.load(open(json_path))
    summ, recs = data["summary"], data["records"]
    rows = {}
    for r in recs:
        key = (r["kernel"], r.get("dtype", "-"))
        row = rows.setdefault(key, dict(n=0, failed=0, worst=0.0, san=0))
        row["n"] += 1
        row["failed"] += not r["passed"]
        if r.get("max_err") is not None and r.get("tol"):
            row["worst"] = max(row["worst"], r["max_err"] / r["tol"])
        row["san"] += r.get("sanitizer_reports", 0) or 0
    lines = [f"# CUDA kernels on the CPU execution target ({summ.get('sanitizer', 'none')})", "",
             f"commit {summ.get('commit', '?')}, {summ.get('date', '?')}, {summ.get('machine', '?')}; "
             f"{summ['cases']} records, {summ['failed']} failed, "
             f"{summ['sanitizer_reports']} sanitizer reports, {summ['seconds']} s. Each record is "
             "one output of one case against the fp64 reference (tolerance: FlashAttention's "
             "rule, DESIGN §7); `python tools/cuda_emulation/run_all.py`."
             + (f" **Partial run: {summ['partial']}.**" if summ.get("partial") else ""), "",
             "| kernel | dtype | records | failed | worst err/tol | sanitizer reports |",
             "|---|---|---|---|---|---|"]
    for (kernel, dtype), row in sorted(rows.items()):
        lines.append(f"| {kernel} | {dtype} | {row['n']} | {row['failed']} | {row['worst']:.3f} | "
                     f"{row['san']} |")
    extra = [r for r in recs if r["kernel"] in ("planted_defect", "race_checker_self_test")]
    if extra:
        lines += ["", "| check | result |", "|---|---|"]
        for r in extra:
            what = r.get("defect") or r["kernel"]
            how = r.get("caught_by") or (f"{r.get('reports_with_barrier')} report(s) with the "
                                         f"barrier, {r.get('reports_without')} without")
            lines.append(f"| {what} | {'caught' if r['passed'] else 'NOT CAUGHT'}: {how} |")
    md = os.path.splitext(json_path)[0] + ".md"
    with open(md, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return md


def _machine() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output file (one record per case/output)")
    ap.add_argument("--sanitize", choices=["address", "thread"])
    ap.add_argument("--quick", action="store_true", help="the CI subset instead of the full matrix")
    ap.add_argument("--defects", nargs="*", metavar="NAME",
                    help="also check the planted defects (all, or the ones named)")
    ap.add_argument("--no-long", action="store_true",
                    help="skip the long-N cases (for the slower sanitizer builds)")
    ap.add_argument("--only", action="append",
                    help="run only cases whose kind (prefill/decode/varlen) or description "
                         "contains this (repeatable: all must match)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the records already in --json and run only the missing cases "
                         "(the file is rewritten after every case, so a long run can stop)")
    args = ap.parse_args()
    if args.sanitize and os.environ.get("SELATTN_EMU_PRELOADED") != "1":
        _reexec_with_runtime(args.sanitize)

    import torch
    torch.set_num_threads(1)
    import cases
    import emulated

    emu = emulated.load(sanitize=args.sanitize)
    prefill = cases.ci_prefill_cases() if args.quick else cases.full_prefill_cases()
    decode = cases.ci_decode_cases() if args.quick else cases.full_decode_cases()
    varlen = cases.ci_varlen_cases() if args.quick else cases.full_varlen_cases()
    work = [("prefill", c) for c in prefill] + [("decode", c) for c in decode] + \
        [("varlen", c) for c in varlen]
    if args.only:
        work = [(k, c) for k, c in work if all(o in f"{k} {c!r}" for o in args.only)]
    if args.no_long:
        work = [(k, c) for k, c in work if getattr(c, "seqlen", 0) < 512]
    # The commit is taken now: the tree may move on while a long sanitizer run goes.
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "csrc", "tools"],
                           capture_output=True, text=True).stdout.strip()
    commit += "+dirty" if dirty else ""
    records, done, elapsed = [], set(), 0.0
    if args.resume and os.path.exists(args.json):
        with open(args.json) as fh:
            old = json.load(fh)
        if old["summary"]["sanitizer"] != (args.sanitize or "none"):
            sys.exit(f"--resume: {args.json} was written with another sanitizer")
        if old["summary"]["commit"] != commit:
            sys.exit(f"--resume: {args.json} is of commit {old['summary']['commit']}, "
                     f"the tree is at {commit}")
        records = [r for r in old["records"] if r["kernel"] != "planted_defect"]
        done = {r["case"] for r in records if "case" in r}
        elapsed = old["summary"]["seconds"]
    work = [(k, c) for k, c in work if repr(c) not in done]
    counter = StderrCounter() if args.sanitize else None
    start = time.time() - elapsed

    def write(partial: bool) -> dict:
        summary = dict(commit=commit, date=time.strftime("%Y-%m-%d"), machine=_machine(),
                       cases=len(records), failed=sum(not r["passed"] for r in records),
                       sanitizer=args.sanitize or "none",
                       sanitizer_reports=sum(r.get("sanitizer_reports", 0) for r in records),
                       seconds=round(time.time() - start, 1))
        if partial:
            summary["partial"] = f"{len(work) - ran} of {len(work)} remaining cases not run yet"
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(dict(summary=summary, records=records), fh, indent=1, default=str)
        os.replace(tmp, args.json)
        return summary

    ran = 0
    try:
        if args.sanitize == "thread" and not any(
                r["kernel"] == "race_checker_self_test" for r in records):
            # The race checker itself: one unordered write/read pair must be reported, the same
            # pair behind a __syncthreads must not.
            out = torch.zeros(4, dtype=torch.int32)
            counts = []
            for barrier in (1, 0):
                emu.lib.selattn_emu_race_test(barrier, emulated._ptr(out))
                counts.append(counter.take()[0])
            records.append(dict(kernel="race_checker_self_test", dtype="-", head_dim=None,
                                shape=None, max_err=None, tol=None,
                                passed=counts[0] == 0 and counts[1] >= 1,
                                reports_with_barrier=counts[0], reports_without=counts[1],
                                sanitizer="thread", sanitizer_reports=0))
            print(f"race checker self-test: {counts[0]} report(s) with the barrier, "
                  f"{counts[1]} without", flush=True)
        for kind, c in work:
            t0 = time.time()
            try:
                check = dict(prefill=cases.check_prefill, decode=cases.check_decode,
                             varlen=cases.check_varlen)[kind]
                recs = check(emu, c)
                error = None
            except Exception as exc:  # a launch failure or runtime report is a failed case
                recs, error = [dict(kernel=f"{getattr(c, 'path', 'decode')}", dtype=cases.NAMES[c.dtype],
                                    head_dim=c.head_dim, shape=c.shape, max_err=None, tol=None,
                                    passed=False)], f"{type(exc).__name__}: {exc}"[:2000]
            san, text = counter.take() if counter else (0, "")
            for r in recs:
                r["case"] = repr(c)
                r["sanitizer"] = args.sanitize or "none"
                r["sanitizer_reports"] = san
                r["runtime_reports"] = 0 if error is None or "report" not in error else 1
                r["seconds"] = round(time.time() - t0, 2)
                if error:
                    r["error"] = error
                if san:
                    r["passed"] = False
                    r["sanitizer_excerpt"] = text[:3000]
            records.extend(recs)
            status = "ok" if all(r["passed"] for r in recs) else "FAIL"
            print(f"{status:4} {kind:7} {c} {time.time() - t0:.1f}s", file=sys.stdout, flush=True)
            ran += 1
            write(partial=True)
        if args.defects is not None:
            for name in args.defects or list(emulated.DEFECTS):
                t0 = time.time()
                broken = emulated.load(sanitize=args.sanitize, defect=name)
                decode_defect = emulated.DEFECTS[name][0].startswith("cuda/decode/")
                probe = (cases.decode_defect_probes() if decode_defect else
                         [cases.PrefillCase(torch.float32, 40, seqlen=70, path="simt"),
                          cases.PrefillCase(torch.bfloat16, 64, seqlen=70, path="tc"),
                          *cases.ci_varlen_cases(), cases.tc_bwd_head_group_cases()[0]])
                caught, how = False, []
                for c in probe:
                    label = getattr(c, "path", "decode")
                    label += " varlen" if isinstance(c, cases.VarlenCase) else ""
                    try:
                        if decode_defect:
                            recs = cases.check_decode(broken, c)
                        elif isinstance(c, cases.VarlenCase):
                            recs = cases.check_varlen(broken, c)
                        else:
                            recs = cases.check_prefill(broken, c)
                        if not all(r["passed"] for r in recs):
                            caught = True
                            how.append(f"{label}: comparison failed")
                    except Exception as exc:
                        caught = True
                        how.append(f"{label}: {type(exc).__name__}")
                    san, _ = counter.take() if counter else (0, "")
                    if san:
                        caught = True
                        how.append(f"{label}: {san} sanitizer report(s)")
                records.append(dict(kernel="planted_defect", defect=name, dtype="-", head_dim=None,
                                    shape=None, max_err=None, tol=None, passed=caught,
                                    caught_by=how, sanitizer=args.sanitize or "none",
                                    seconds=round(time.time() - t0, 2)))
                print(f"{'ok' if caught else 'FAIL':4} defect {name}: {how}", flush=True)
    finally:
        if counter:
            counter.close()
    summary = write(partial=False)
    print(json.dumps(summary))
    print("wrote", write_markdown(args.json))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
