"""Builds the one extension, ``selattn_ext._C``, and records how it was built.

CUDA sources (every ``.cu`` under csrc/cuda, in any subfolder except folders named
``emulation``, which hold host-only code) are compiled when torch was built with CUDA and a CUDA
toolkit is found; otherwise the build is CPU only. Next to the compiled module the build writes
``selattn_ext/_build_info.py`` (versions, archs, CPU ISA), which ``import selattn_ext`` checks
against the running torch before it loads ``_C`` and which ``selattn_ext.show_config()`` prints.

Environment:
  SELATTN_FORCE_CPU=1        skip CUDA even when it is available
  SELATTN_CUDA_ARCHS="80;90" SM architectures to build (default "80;90"); each gets sm_XX
                             machine code, and the highest also gets compute_XX PTX so GPUs newer
                             than the list can JIT-compile the kernels
  MAX_JOBS=N                 parallel compile jobs (honoured by torch's ninja build)
  CUDA_HOME                  toolkit root; if unset and ``nvcc`` on PATH is a wrapper script,
                             /usr/local/cuda is tried before torch's own guess
"""

import os
import platform
import re
import subprocess

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


def _package_version() -> str:
    # Read, not imported: importing selattn_ext would import torch and the not-yet-built _C.
    with open(os.path.join(ROOT, "selattn_ext", "_version.py")) as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), flags=re.M)
    if match is None:
        raise RuntimeError("selattn_ext/_version.py has no __version__ = \"...\" line")
    return match.group(1)


def _want_cuda() -> bool:
    if os.environ.get("SELATTN_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _cuda_archs() -> list:
    """SELATTN_CUDA_ARCHS as a list like ["80", "90"] (dots dropped, "9.0" == "90")."""
    archs = os.environ.get("SELATTN_CUDA_ARCHS", "80;90")
    out = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    for arch in out:
        if not re.fullmatch(r"\d+[af]?", arch):
            raise ValueError(f"SELATTN_CUDA_ARCHS: bad architecture {arch!r} (want e.g. \"80;90\")")
    if not out:
        raise ValueError("SELATTN_CUDA_ARCHS is empty")
    return out


def _arch_number(arch: str) -> int:
    return int(re.match(r"\d+", arch).group(0))


def _gencode_flags(archs: list) -> list:
    """sm_XX machine code for every arch, plus PTX for the highest (as FlashAttention does):
    the driver JIT-compiles that PTX on GPUs newer than any listed arch. The PTX drops an
    arch-specific suffix ("90a"), whose PTX would not run on later GPUs."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ptx = str(max(_arch_number(a) for a in archs))
    flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


def _compiled_archs(archs: list) -> list:
    ptx = str(max(_arch_number(a) for a in archs))
    return [f"sm_{a}" for a in archs] + [f"compute_{ptx}"]


def _cuda_sources() -> list:
    """Every .cu under csrc/cuda, relative to ROOT, sorted; folders named ``emulation`` (CPU
    emulations of the kernels' index math, not device code) are skipped."""
    sources = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "csrc", "cuda")):
        dirnames[:] = sorted(d for d in dirnames if d != "emulation")
        sources += [os.path.relpath(os.path.join(dirpath, f), ROOT)
                    for f in filenames if f.endswith(".cu")]
    return sorted(sources)


def _cpp_sources() -> list:
    return sorted(os.path.relpath(os.path.join(ROOT, "csrc", d, f), ROOT)
                  for d in ("", "cpu")
                  for f in os.listdir(os.path.join(ROOT, "csrc", d)) if f.endswith(".cpp"))


def _is_x86() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def _cpu_kernel_flags() -> list:
    # The CPU kernels use at::vec; its wide paths exist only when compiled for them. x86-64
    # builds target AVX2+FMA (every x86 server of the last decade); ops.cpp refuses to run
    # the kernels on a CPU without AVX2 instead of crashing with SIGILL.
    if _is_x86():
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
                "-DSELATTN_CPU_AVX2"]
    return []


def _nvcc_version() -> str:
    """The toolkit's full version ("13.0.48") from ``nvcc --version``; "unknown" if unreadable."""
    try:
        text = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"],
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    match = re.search(r"V(\d+\.\d+(?:\.\d+)?)", text) or re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else "unknown"


def _build_info(with_cuda: bool, archs: list) -> dict:
    return {
        "version": _package_version(),
        "torch_version": str(torch.__version__),
        "torch_git_version": torch.version.git_version,
        "torch_cuda_version": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_toolkit_version": _nvcc_version() if with_cuda else None,
        "cuda_archs": _compiled_archs(archs) if with_cuda else [],
        "cpu_isa": "AVX2" if _is_x86() else "none",
        "python_version": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
    }


class _BuildExt(BuildExtension):
    """BuildExtension that also writes ``_build_info.py`` next to the built ``_C`` (in build/
    for a wheel, in the source tree for an in-place/editable build), so the record always
    describes the binary beside it."""

    build_info: dict = {}

    def run(self):
        super().run()
        path = os.path.join(os.path.dirname(self.get_ext_fullpath("selattn_ext._C")),
                            "_build_info.py")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("# Written by setup.py when selattn_ext._C was built; not in git.\n"
                    "# Read by selattn_ext/_config.py (version check, show_config()).\n"
                    f"BUILD_INFO = {self.build_info!r}\n")
        self._build_info_path = path

    def get_outputs(self):
        outputs = super().get_outputs()
        path = getattr(self, "_build_info_path", None)
        return outputs + [path] if path else outputs


def make_extension():
    cxx_flags = ["-O3", "-fvisibility=hidden"] + _cpu_kernel_flags()
    sources = _cpp_sources()
    # Headers are included as "cpu/x.h", "cuda/x.cuh", "prefill_params.h": relative to csrc.
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        archs = _cuda_archs()
        _BuildExt.build_info = _build_info(True, archs)
        nvcc_flags = [
            "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
            "-lineinfo", "-Xptxas=-warn-spills",
        ] + _gencode_flags(archs)
        return CUDAExtension(
            "selattn_ext._C",
            sources + _cuda_sources(),
            include_dirs=include_dirs,
            define_macros=[("SELATTN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    _BuildExt.build_info = _build_info(False, [])
    return CppExtension(
        "selattn_ext._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
    )


# Guarded so tests can import this file for its helpers without running a build.
if __name__ == "__main__":
    setup(
        ext_modules=[make_extension()],
        cmdclass={"build_ext": _BuildExt},
    )
