"""The GPU check's scripts, run where no GPU is: bench/gpu_check.sh parses, and
bench/prefill_paths.py runs end to end in its dry mode on the CPU kernels (tiny shapes), writing
its JSON and markdown with a bound for every timed path."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_gpu_check_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", "gpu_check.sh")], check=True)


def test_prefill_paths_dry_run(tmp_path):
    import prefill_paths

    prefill_paths.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path), "--no-memory"])
    js = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert len(js) == 1
    rows = json.load(open(tmp_path / js[0]))["rows"]
    assert {(r["N"], r["mode"]) for r in rows} == {(64, "fwd"), (64, "fwdbwd"), (128, "fwd"),
                                                    (128, "fwdbwd")}
    for r in rows:
        for m in ("tc", "sdpa_flash"):
            assert r[f"{m}_ms"] > 0 and r[f"{m}_bound_ms"] > 0
            assert 0 < r[f"{m}_pct_of_bound"] == 100 * r[f"{m}_bound_ms"] / r[f"{m}_ms"]
        assert "tc/sdpa" in r
