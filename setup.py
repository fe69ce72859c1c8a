"""Builds the one extension, ``selattn_ext._C``.

CUDA sources (csrc/cuda/*.cu) are compiled when torch was built with CUDA and a CUDA toolkit
is found; otherwise the build is CPU only.

Environment:
  SELATTN_FORCE_CPU=1        skip CUDA even when it is available
  SELATTN_CUDA_ARCHS="80;90" SM architectures to build (default "80;90")
  MAX_JOBS=N                 parallel compile jobs (honoured by torch's ninja build)
  CUDA_HOME                  toolkit root; if unset and ``nvcc`` on PATH is a wrapper script,
                             /usr/local/cuda is tried before torch's own guess
"""

import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _pick_cuda_home() -> None:
    # torch guesses CUDA_HOME as dirname(dirname(which nvcc)); with a wrapper script in
    # /usr/local/bin that yields /usr/local, which has no cudart. Prefer a real toolkit root.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = cand
            return


_pick_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    if os.environ.get("SELATTN_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _gencode_flags() -> list:
    archs = os.environ.get("SELATTN_CUDA_ARCHS", "80;90")
    flags = []
    for arch in filter(None, (a.strip() for a in archs.replace(",", ";").split(";"))):
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def _cpu_kernel_flags() -> list:
    # The CPU kernels use at::vec; its wide paths exist only when compiled for them. x86-64
    # builds target AVX2+FMA (every x86 server of the last decade); ops.cpp refuses to run
    # the kernels on a CPU without AVX2 instead of crashing with SIGILL.
    if platform.machine() in ("x86_64", "AMD64"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
                "-DSELATTN_CPU_AVX2"]
    return []


def make_extension():
    cxx_flags = ["-O3", "-fvisibility=hidden"] + _cpu_kernel_flags()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        # Every .cu under csrc/cuda except the CPU execution target's (emulation/: host only).
        sources += sorted(f for f in glob.glob("csrc/cuda/**/*.cu", recursive=True)
                          if "/emulation/" not in f.replace(os.sep, "/"))
        nvcc_flags = [
            "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
            "-lineinfo", "-Xptxas=-warn-spills",
        ] + _gencode_flags()
        return CUDAExtension(
            "selattn_ext._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("SELATTN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    return CppExtension(
        "selattn_ext._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
    )


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
)
