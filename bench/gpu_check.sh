#!/usr/bin/env bash
# The GPU check (shared/GPU_CHECK.md): build in place, CUDA tests, compute-sanitizer memcheck and
# racecheck, CUDA benchmarks; a pass/fail table last. Run from the repository root:
#     bench/gpu_check.sh OUTDIR
# Every step has its own timeout, capped by what is left of a 530 s budget, so the whole run
# stays under 9 minutes. A failing step is recorded and the script goes on; exit status 1 if any
# step failed.
set -u
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=530
STEPS=()
RESULTS=()

# run_step NAME MAX_SECONDS COMMAND...: logs to OUT/NAME.log, records pass/fail/timeout/skip.
run_step() {
  local name=$1 max=$2
  shift 2
  local left=$((START + BUDGET - $(date +%s)))
  local limit=$((max < left ? max : left))
  STEPS+=("$name")
  if ((limit < 10)); then
    RESULTS+=("SKIP (no time left)")
    echo "### $name: skipped, no time left"
    return
  fi
  echo "### $name (timeout ${limit}s): $*"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0))
  tail -n 25 "$OUT/$name.log"
  if ((rc == 0)); then
    RESULTS+=("PASS (${dt}s)")
  elif ((rc == 124 || rc == 137)); then
    RESULTS+=("FAIL timeout after ${dt}s")
  else
    RESULTS+=("FAIL rc=$rc (${dt}s)")
  fi
}

# require_clean NAME PATTERN: a PASS step whose log lacks PATTERN (the sanitizer's clean summary
# line) becomes a FAIL, in case a report does not change the exit status.
require_clean() {
  local last=$((${#STEPS[@]} - 1))
  [[ ${STEPS[$last]} == "$1" && ${RESULTS[$last]} == PASS* ]] || return 0
  if ! grep -Eq "$2" "$OUT/$1.log"; then
    RESULTS[$last]="FAIL (no clean sanitizer summary in $1.log)"
  fi
}

echo "=== versions"
{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  nvcc --version 2>/dev/null | tail -n 2 || true
  $PY -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  compute-sanitizer --version 2>/dev/null | tail -n 1 || true
} 2>&1 | tee "$OUT/versions.txt"

run_step build 240 env MAX_JOBS=16 SELATTN_CUDA_ARCHS=90 \
  $PY -m pip install --no-build-isolation --no-deps -v -e .
# Registers / shared memory per kernel, for the record (not a pass/fail step).
cuobjdump -res-usage selattn_ext/_C*.so >"$OUT/res_usage.txt" 2>&1 || true
run_step pytest_cuda 150 $PY -m pytest python_tests -x -q -m cuda
# --error-exitcode makes any sanitizer report fail the step even if the script itself passed.
# Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees overruns
# that would otherwise land inside a pooled block. API-error reports are off because torch's
# own probing calls can trip them; our launch errors surface as exceptions (script failure).
run_step memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
  --report-api-errors no --error-exitcode 9 $PY bench/cuda_sanitize.py
require_clean memcheck "ERROR SUMMARY: 0 errors"
run_step racecheck 120 compute-sanitizer --tool racecheck --racecheck-report all \
  --report-api-errors no --error-exitcode 9 $PY bench/cuda_sanitize.py
require_clean racecheck "RACECHECK SUMMARY: 0 hazards|ERROR SUMMARY: 0 errors"
# Quick look at the paths bench/prefill.py does not separate: tensor-core vs SIMT forward,
# SIMT vs opt-in tensor-core backward, against causal SDPA (bf16, B1 H16 N4096 D128).
read -r -d '' QUICK_PERF <<'PYEOF'
import os, torch, torch.nn.functional as F
import selattn_ext
from selattn_ext import ops, reference
torch.manual_seed(0)
B, H, N, D = 1, 16, 4096, 128
q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
qs, ks = reference.selection_inputs(q, k, 0)
s = D ** -0.5
out, lse = ops.prefill_fwd(q, k, v, qs, ks, s)
dout = torch.randn_like(out)
def ms(fn, reps=10):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]
def with_env(name, val, fn):
    os.environ[name] = val
    try:
        return fn()
    finally:
        os.environ.pop(name)
sdpa_f = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
sdpa_b = ms(lambda: torch.autograd.grad(o, (qq, kk, vv), dout, retain_graph=True))
tc_f = ms(lambda: ops.prefill_fwd(q, k, v, qs, ks, s))
simt_f = with_env("SELATTN_CUDA_FORCE_SIMT", "1", lambda: ms(lambda: ops.prefill_fwd(q, k, v, qs, ks, s), 3))
bwd = lambda: ops.prefill_bwd(dout, q, k, v, qs, ks, out, lse, None, s)
simt_b = ms(bwd, 3)
tc_b = with_env("SELATTN_CUDA_TC_BWD", "1", lambda: ms(bwd))
print(f"fwd ms: sdpa {sdpa_f:.3f}  tc {tc_f:.3f} ({tc_f / sdpa_f:.2f}x)  simt {simt_f:.3f} ({simt_f / sdpa_f:.2f}x)")
print(f"bwd ms: sdpa {sdpa_b:.3f}  tc {tc_b:.3f} ({tc_b / sdpa_b:.2f}x)  simt {simt_b:.3f} ({simt_b / sdpa_b:.2f}x)")
PYEOF
run_step quick_perf 90 $PY -c "$QUICK_PERF"
run_step bench_prefill 150 $PY bench/prefill.py --device cuda --out "$OUT"
if [[ -f bench/decode.py ]]; then
  run_step bench_decode 60 $PY bench/decode.py --device cuda --dtype bfloat16 --head-dim 128 --batch 16 --n 2048 8192 32768 --reps 5 --out "$OUT"
fi

echo
echo "=== key ratios (from the benchmark markdown, if any)"
for f in "$OUT"/*.md; do
  [[ -f $f ]] || continue
  echo "--- $(basename "$f")"
  head -n 30 "$f"
done

echo
echo "=== quick perf"
grep -E "^(fwd|bwd) ms" "$OUT/quick_perf.log" 2>/dev/null || echo "(none)"

echo
echo "=== summary ($(($(date +%s) - START))s total, logs in $OUT)"
FAILED=0
for i in "${!STEPS[@]}"; do
  printf '%-16s %s\n' "${STEPS[$i]}" "${RESULTS[$i]}"
  [[ ${RESULTS[$i]} == PASS* ]] || FAILED=1
done
exit $FAILED
