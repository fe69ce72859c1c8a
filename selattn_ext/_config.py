"""How this copy of selattn_ext was built: the torch check run on import, and show_config().

setup.py writes ``_build_info.py`` next to the compiled ``_C`` when it builds it. This module
reads that record without loading ``_C``, so a torch upgrade since the build gives a clear
"rebuild" error instead of an undefined-symbol error from the dynamic loader.
"""

from __future__ import annotations

import copy
import importlib.util
import platform
import sys
from typing import Any, Dict, Optional, TextIO

import torch

from ._version import __version__

__all__ = ["build_info", "check_build", "show_config"]

_REBUILD = ("pip install --no-build-isolation --no-deps --force-reinstall . (from a checkout or "
            "an unpacked sdist), or pip install --no-build-isolation -e . for a development "
            "checkout")


def _recorded() -> Optional[Dict[str, Any]]:
    """The build record, or None when _C was built before builds wrote one."""
    try:
        from ._build_info import BUILD_INFO
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}._build_info":
            raise
        return None
    return BUILD_INFO


def check_build(info: Optional[Dict[str, Any]] = None,
                torch_version: Optional[str] = None) -> None:
    """Raise ImportError, before anything loads ``selattn_ext._C``, when the extension is not
    built or was built against another torch than the one imported.

    ``info`` and ``torch_version`` default to the recorded build and the running torch; tests
    pass others. A build without a record (made before records existed) is not checked.
    """
    if info is None:
        if importlib.util.find_spec(f"{__package__}._C") is None:
            raise ImportError(
                "selattn_ext's compiled extension (selattn_ext._C) is missing: this copy was "
                f"never built. Build it: {_REBUILD}.")
        info = _recorded()
        if info is None:
            return
    running = str(torch.__version__ if torch_version is None else torch_version)
    built = info.get("torch_version")
    if built != running:
        raise ImportError(
            f"selattn_ext was built against torch {built}, but torch {running} is imported; its "
            "compiled extension (selattn_ext._C) only works with the torch it was compiled "
            f"against. Rebuild selattn_ext with this torch: {_REBUILD}.")


def build_info() -> Dict[str, Any]:
    """The build record as a dict (a copy): ``version``, ``torch_version`` (built against),
    ``torch_git_version``, ``torch_cuda_version``, ``with_cuda`` (CUDA kernels present),
    ``cuda_toolkit_version`` (nvcc), ``cuda_archs`` (``sm_XX`` machine code and ``compute_XX``
    PTX), ``cpu_isa`` ("AVX2" or "none"), ``python_version``, ``platform``. Unknown values are
    None when the extension was built before builds recorded them."""
    info = _recorded()
    if info is None:
        keys = ("torch_version", "torch_git_version", "torch_cuda_version", "with_cuda",
                "cuda_toolkit_version", "cuda_archs", "cpu_isa", "python_version", "platform")
        info = dict.fromkeys(keys)
        info["version"] = __version__
    return copy.deepcopy(info)


def _format(info: Dict[str, Any]) -> str:
    def show(value: Any) -> str:
        return "unknown (built before builds were recorded; rebuild)" if value is None else str(value)

    archs = info.get("cuda_archs") or []
    sm = " ".join(a for a in archs if a.startswith("sm_")) or "none"
    ptx = " ".join(a for a in archs if a.startswith("compute_")) or "none"
    if info.get("with_cuda"):
        cuda = (f"yes\n  CUDA toolkit:            {show(info.get('cuda_toolkit_version'))} "
                f"(torch's CUDA {info.get('torch_cuda_version')})\n"
                f"  CUDA archs:              {sm}; PTX {ptx}")
    elif info.get("with_cuda") is None:
        cuda = show(None)
    else:
        cuda = "no (CPU-only build)"
    lines = [
        f"selattn_ext {info.get('version')}",
        f"  built against torch:     {show(info.get('torch_version'))}",
        f"  running torch:           {torch.__version__}",
        f"  CUDA kernels:            {cuda}",
        f"  CPU kernel ISA:          {show(info.get('cpu_isa'))} "
        f"(this CPU: {torch.backends.cpu.get_cpu_capability()})",
        f"  CUDA device available:   {'yes' if torch.cuda.is_available() else 'no'}",
        f"  built with Python:       {show(info.get('python_version'))} on "
        f"{show(info.get('platform'))} (running {platform.python_version()})",
    ]
    return "\n".join(lines)


def show_config(file: Optional[TextIO] = None) -> None:
    """Print how selattn_ext was built, like ``torch.__config__.show()``: package version, the torch it was built against and the running one, whether CUDA kernels
    are present with the toolkit version and compiled archs, the CPU kernels' ISA and this
    CPU's. :func:`build_info` gives the same as a dict."""
    print(_format(build_info()), file=sys.stdout if file is None else file)
