#!/usr/bin/env bash
# Tests what a user installs, not the source tree: sdist from this checkout -> unpacked into an
# empty folder -> CPU-only wheel built there -> installed into a fresh venv -> a smoke subset of
# the suite and the README snippets run from a folder outside any source tree, asserting that
# selattn_ext is the installed copy. The sdist and the wheel are checked file by file against
# the checkout (.ci/check_dist.py).
#   bash .ci/install_check.sh PYTHON
# PYTHON: a venv's python with torch, pytest, hypothesis, transformers, build, wheel,
# setuptools and ninja (run.sh's). The fresh venv sees those packages through a .pth instead of
# installing torch again; only selattn_ext is installed into it.
# Called by `bash run.sh test` after the main suite (so by CI); MAX_JOBS as for any build;
# SELATTN_DIST_DIR=DIR keeps a copy of the sdist and the wheel there (all else is deleted).
set -euo pipefail
py=${1:?usage: bash .ci/install_check.sh PYTHON}
# Absolute (the wheel is built from another folder), without resolving the venv's symlink.
py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/selattn-install-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
export SELATTN_FORCE_CPU=1   # a CPU-only wheel proves the packaging; the main build covers CUDA
t0=$(date +%s)
step() { echo "install_check: [$(( $(date +%s) - t0 )) s] $*"; }

step "sdist from the checkout"
"$py" -m build --sdist --no-isolation -o "$work/dist" . >"$work/sdist.log" 2>&1 \
  || { tail -40 "$work/sdist.log"; exit 1; }
sdist=$(echo "$work"/dist/*.tar.gz)
"$py" .ci/check_dist.py sdist "$sdist"

step "CPU-only wheel built from the unpacked sdist in an empty folder"
mkdir "$work/src"
tar -xzf "$sdist" -C "$work/src" --strip-components=1
(cd "$work/src" && "$py" -m pip wheel -q --disable-pip-version-check --no-build-isolation \
   --no-deps -w "$work/dist" .) >"$work/wheel.log" 2>&1 || { tail -40 "$work/wheel.log"; exit 1; }
wheel=$(echo "$work"/dist/*.whl)
"$py" .ci/check_dist.py wheel "$wheel"
if [ -n "${SELATTN_DIST_DIR:-}" ]; then mkdir -p "$SELATTN_DIST_DIR" && cp "$sdist" "$wheel" "$SELATTN_DIST_DIR/"; fi

step "fresh venv beside the build venv's torch, wheel installed"
"$py" -m venv --without-pip "$work/venv"
vpy="$work/venv/bin/python"
site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
# Every site-packages folder the build python sees (its own and those its .pth files add):
# a .pth line only adds a folder, it does not run that folder's .pth files, so an editable
# selattn_ext there stays invisible.
"$py" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
  >"$site/_build_venv_packages.pth"
# pip is the build venv's (seen through the .pth); --ignore-installed: another selattn_ext
# visible there must not be "uninstalled" or taken as already satisfying this one.
"$vpy" -m pip install -q --disable-pip-version-check --no-deps --no-index --ignore-installed \
  "$wheel"

step "smoke tests against the installed copy, from outside the source tree"
mkdir "$work/smoke"
cp -r "$work/src/python_tests" "$work/src/README.md" "$work/src/pyproject.toml" "$work/smoke/"
cd "$work/smoke"
"$vpy" -c 'import selattn_ext; print("install_check: selattn_ext from", selattn_ext.__file__); selattn_ext.show_config()'
SELATTN_EXPECT_INSTALLED_IN="$site" "$vpy" -m pytest -q -p no:cacheprovider \
  python_tests/test_build_config.py python_tests/test_readme.py \
  python_tests/test_prefill_bad_inputs.py \
  "python_tests/test_transformers.py::test_import_selattn_ext_does_not_import_transformers" \
  "python_tests/test_transformers.py::test_missing_transformers_gives_clear_import_error"
step "passed"
