"""selattn_ext: fused selective attention for PyTorch (CPU and CUDA).

    out = selattn_ext.attention(q, k, v)            # (B, H, N, D), causal, selection head 0
    selattn_ext.show_config()                       # how this copy was built

See README.md and shared/DESIGN.md for the semantics.
"""

from ._version import __version__
from . import _config
from ._config import build_info, show_config

# Before anything loads the compiled _C: a torch other than the build's gets a "rebuild" error
# here instead of an undefined-symbol error from the dynamic loader.
_config.check_build()

from . import nn, ops, reference  # noqa: E402
from .attention import attention, attention_varlen  # noqa: E402
from .cache import SelectiveKVCache, decode  # noqa: E402
from .memory import memory_loss  # noqa: E402

__all__ = ["attention", "attention_varlen", "build_info", "decode", "memory_loss", "nn", "ops",
           "reference", "SelectiveKVCache", "show_config"]
