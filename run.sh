#!/usr/bin/env bash
# One entry point for a fresh clone: set everything up (venv, torch, build), then run a job.
#   bash run.sh demo    build, then show agreement with the reference and speed vs baselines
#   bash run.sh test    build, then run the test suite, then test the installed wheel (what CI runs)
#   bash run.sh installcheck  only the installed-wheel test (.ci/install_check.sh)
#   bash run.sh setup   only set up
# Environment: SELATTN_TORCH (pip spec, default torch==2.14.1), SELATTN_VENV (default .venv),
# SELATTN_FORCE_CPU=1, SELATTN_CUDA_ARCHS, MAX_JOBS, CUDA_HOME (see setup.py),
# SELATTN_SKIP_CTEST=1, SELATTN_SKIP_INSTALL_CHECK=1 (test: skip those steps).
set -euo pipefail
cd "$(dirname "$0")"
job=${1:-demo}
venv=${SELATTN_VENV:-.venv}
py="$venv/bin/python"

[ -x "$py" ] || python3 -m venv "$venv"
"$py" -m pip install -q --disable-pip-version-check "${SELATTN_TORCH:-torch==2.14.1}" \
    numpy pytest hypothesis ninja "setuptools>=77" wheel build tqdm "transformers>=5"
# `nvcc` on PATH may be a wrapper script; torch needs the real toolkit root to link cudart.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
start=$(date +%s)
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
echo "run.sh: built selattn_ext in $(( $(date +%s) - start )) s"

case "$job" in
  setup) ;;
  test)
    # The C++ test (CMakeLists.txt, tests_cpp/) against libtorch, then the pytest suite.
    if command -v cmake >/dev/null && [ "${SELATTN_SKIP_CTEST:-0}" != 1 ]; then
      cmake -S . -B build-cmake -DCMAKE_PREFIX_PATH="$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >build-cmake.log 2>&1 \
        || { cat build-cmake.log; exit 1; }
      cmake --build build-cmake -j"$MAX_JOBS" >>build-cmake.log 2>&1 || { tail -50 build-cmake.log; exit 1; }
      ctest --test-dir build-cmake --output-on-failure
    fi
    "$py" -m pytest python_tests -q
    # The same package as a user gets it: sdist -> wheel -> fresh venv -> smoke tests (~5 min).
    if [ "${SELATTN_SKIP_INSTALL_CHECK:-0}" != 1 ]; then bash .ci/install_check.sh "$py"; fi ;;
  installcheck) bash .ci/install_check.sh "$py" ;;
  demo) exec "$py" bench/demo.py ;;
  *) echo "usage: bash run.sh [demo|test|installcheck|setup]" >&2; exit 2 ;;
esac
