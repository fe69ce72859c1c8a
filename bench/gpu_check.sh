#!/usr/bin/env bash
# The GPU check (shared/GPU_CHECK.md): build in place, CUDA tests, compute-sanitizer memcheck and
# racecheck, CUDA benchmarks; a pass/fail table last. Run from the repository root:
#     bench/gpu_check.sh OUTDIR
# Every step has its own timeout, capped by what is left of a 530 s budget (GPU_CHECK_BUDGET),
# so the whole run stays under 9 minutes. A failing step is recorded and the script goes on;
# exit status 1 if any step failed (steps listed in OPTIONAL excepted). Order: build, tests,
# cost model, benchmarks (what a first GPU run must report), sanitizers, the optional rest.
set -u
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-530}
STEPS=()
RESULTS=()
OPTIONAL=()  # steps whose skip or failure does not fail the run

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
# The cost model (pure Python, seconds): the bounds the benchmarks below are compared with.
run_step roofline 30 $PY bench/roofline.py --out "$OUT"
# The prefill paths (tensor-core and SIMT forward/backward) against causal SDPA-flash and
# flash_attn (if importable), bf16, D = 64/128, N = 1K..16K, peak memory, % of the cost model's
# bound (bench/roofline.py); then decode: a budget sweep (512..16K, B = 1/16/64) as achieved GB/s
# over the measured copy bandwidth and % of the roofline, and the full-cache baselines at
# N = 32K, budget 2K.
run_step prefill_paths 110 $PY bench/prefill_paths.py --out "$OUT"
run_step decode_sweep 50 $PY bench/decode.py --device cuda --dtype bfloat16 --head-dim 128 \
  --heads 8 --batch 1 16 64 --n 32768 --budgets 512 1024 2048 4096 8192 16384 --no-full \
  --reps 5 --inner 5 --out "$OUT"
run_step decode_full 50 $PY bench/decode.py --device cuda --dtype bfloat16 --head-dim 128 \
  --heads 8 --batch 1 16 --n 32768 --budgets 2048 --reps 5 --inner 5 --out "$OUT"
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
# The user-facing comparison (ours vs the F-mask baselines), only with time to spare.
OPTIONAL=(bench_prefill)
run_step bench_prefill 60 $PY bench/prefill.py --device cuda --skip flex,naive \
  --seqlens 2048,8192 --head-dims 128 --reps 5 --out "$OUT"

echo
echo "=== prefill paths (ms, x sdpa_flash, % of the roofline bound)"
grep -E "^D[0-9]+ N" "$OUT/prefill_paths.log" 2>/dev/null || echo "(none)"
echo
echo "=== decode (achieved GB/s, fraction of copy bandwidth, % of roofline)"
grep -hE "^B= *[0-9]+ N=" "$OUT/decode_sweep.log" "$OUT/decode_full.log" 2>/dev/null \
  || echo "(none)"

echo
echo "=== summary ($(($(date +%s) - START))s total, logs in $OUT)"
FAILED=0
for i in "${!STEPS[@]}"; do
  printf '%-16s %s\n' "${STEPS[$i]}" "${RESULTS[$i]}"
  [[ ${RESULTS[$i]} == PASS* || " ${OPTIONAL[*]} " == *" ${STEPS[$i]} "* ]] || FAILED=1
done
exit $FAILED
