"""selattn_ext: fused selective attention for PyTorch (CPU and CUDA).

    out = selattn_ext.attention(q, k, v)            # (B, H, N, D), causal, selection head 0

See README.md and shared/DESIGN.md for the semantics.
"""

from . import nn, ops, reference
from .attention import attention, attention_varlen
from .cache import SelectiveKVCache, decode
from .memory import memory_loss

__all__ = ["attention", "attention_varlen", "decode", "memory_loss", "nn", "ops", "reference",
           "SelectiveKVCache"]
__version__ = "0.1.0"
