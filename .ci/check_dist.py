"""Checks that a built sdist or wheel holds every file it must, against the source checkout.

    python .ci/check_dist.py sdist dist/selattn_ext-0.1.0.tar.gz
    python .ci/check_dist.py wheel dist/selattn_ext-0.1.0-cp311-cp311-linux_x86_64.whl

The expected files are the checkout's tracked files (git ls-files,
or a walk of the folders without git), so a new header, subfolder or subpackage is checked
without editing this file. Prints what was checked; exits 1 listing what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from typing import Iterable, List

# What an sdist needs to build and test the extension.
SDIST_DIRS = ("csrc", "selattn_ext", "python_tests", "tests_cpp")
SDIST_FILES = ("LICENSE", "README.md", "CMakeLists.txt", "setup.py", "pyproject.toml")
_SKIP_PARTS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".o")
_GENERATED = {"selattn_ext/_build_info.py"}  # written by each build, never shipped in an sdist


def tracked_files(root: str, dirs: Iterable[str]) -> List[str]:
    """Files under ``dirs`` (paths relative to ``root``, '/'-separated): git's tracked files
    when ``root`` is a git checkout, else every file except caches and build products."""
    dirs = list(dirs)
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "--", *dirs], capture_output=True,
                             text=True, check=True).stdout.split()
        if out:
            return sorted(out)
    except (OSError, subprocess.CalledProcessError):
        pass
    found = []
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, d)):
            dirnames[:] = [n for n in dirnames if n not in _SKIP_PARTS]
            found += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                      for f in filenames if not f.endswith(_SKIP_SUFFIXES)]
    return sorted(set(found) - _GENERATED)


def sdist_names(path: str) -> List[str]:
    """Member files of an sdist, without the leading ``name-version/`` folder."""
    with tarfile.open(path) as tar:
        return sorted(m.name.split("/", 1)[1] for m in tar.getmembers()
                      if m.isfile() and "/" in m.name)


def wheel_names(path: str) -> List[str]:
    with zipfile.ZipFile(path) as whl:
        return sorted(n for n in whl.namelist() if not n.endswith("/"))


def missing_from_sdist(names: List[str], root: str) -> List[str]:
    want = set(tracked_files(root, SDIST_DIRS)) | set(SDIST_FILES)
    return sorted(want - set(names))


def missing_from_wheel(names: List[str], root: str) -> List[str]:
    have = set(names)
    want = {f for f in tracked_files(root, ["selattn_ext"]) if f.endswith(".py")}
    want.add("selattn_ext/_build_info.py")
    missing = sorted(want - have)
    if not any(n.startswith("selattn_ext/_C") and n.endswith((".so", ".pyd")) for n in have):
        missing.append("selattn_ext/_C*.so (the compiled extension)")
    if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
               for n in have):
        missing.append("*.dist-info/licenses/LICENSE")
    return missing


def main(argv: List[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("sdist", "wheel"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, path = argv[1], argv[2]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this script's checkout
    names = sdist_names(path) if kind == "sdist" else wheel_names(path)
    missing = (missing_from_sdist if kind == "sdist" else missing_from_wheel)(names, root)
    size_kb = os.path.getsize(path) / 1024
    if missing:
        print(f"check_dist: {os.path.basename(path)} ({len(names)} files, {size_kb:.0f} KiB) "
              f"lacks {len(missing)} file(s):", file=sys.stderr)
        for name in missing:
            print(f"  {name}", file=sys.stderr)
        return 1
    print(f"check_dist: {os.path.basename(path)}: {len(names)} files, {size_kb:.0f} KiB, "
          "nothing missing")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
