"""A minimal byte-level decoder LM built from ``selattn_ext.nn.SelectiveSelfAttention``, and the
data it trains on: the ``.py`` sources of the running Python's standard library (offline on
every machine). Used by ``examples/train_tiny_lm.py`` and ``bench/quality.py``.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selattn_ext.nn import SelectiveSelfAttention

BOS = 256  # token id of the beginning-of-sequence marker; bytes are 0..255
VOCAB = 257


@dataclass
class TinyLMConfig:
    dim: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: Optional[int] = None
    mlp_ratio: int = 4
    selective: bool = True  # False: plain causal attention, same parameters (the baseline)
    context: int = 256
    memory_tau: Optional[float] = None  # set: attention layers keep M for the memory loss


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = SelectiveSelfAttention(cfg.dim, cfg.heads, cfg.kv_heads, selective=cfg.selective,
                                           memory_tau=cfg.memory_tau)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim))

    def forward(self, x: Tensor, cache=None, **packed) -> Tensor:
        x = x + self.attn(self.norm1(x), cache, **packed)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Decoder-only LM over bytes; position 0 of every sequence must be the BOS token."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor, caches: Optional[List] = None, *,
                cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
        """tokens (B, N) -> logits (B, N, VOCAB). With ``caches`` (one per layer), decodes.
        With ``cu_seqlens`` (int32, B' + 1), tokens (1, total) holds B' packed sequences, each
        starting with its own BOS (selective attention only)."""
        x = self.embed(tokens)
        packed = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], **packed)
        return self.head(self.norm(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------
# Data: the standard library's .py files, split by file.

def stdlib_sources() -> List[str]:
    """Paths of the stdlib's .py files (site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(paths)


def is_validation(path: str, root: str, val_percent: int = 5) -> bool:
    """Deterministic split by a hash of the path relative to the stdlib root."""
    rel = os.path.relpath(path, root).encode()
    return int(hashlib.sha256(rel).hexdigest(), 16) % 100 < val_percent


def load_stdlib_bytes(val_percent: int = 5) -> Tuple[Tensor, Tensor, Dict[str, int]]:
    """(train, val) uint8 tensors of concatenated files, and byte/file counts."""
    root = sysconfig.get_paths()["stdlib"]
    train, val = bytearray(), bytearray()
    counts = {"train_files": 0, "val_files": 0}
    for p in stdlib_sources():
        with open(p, "rb") as f:
            data = f.read()
        if is_validation(p, root, val_percent):
            val += data
            counts["val_files"] += 1
        else:
            train += data
            counts["train_files"] += 1
    counts.update(train_bytes=len(train), val_bytes=len(val))
    return (torch.frombuffer(train, dtype=torch.uint8).clone(),
            torch.frombuffer(val, dtype=torch.uint8).clone(), counts)


def windows(data: Tensor, context: int, starts: Tensor) -> Tuple[Tensor, Tensor]:
    """Inputs [BOS, x_0 .. x_{T-2}] and targets [x_0 .. x_{T-1}] for windows at ``starts``."""
    idx = starts[:, None] + torch.arange(context)[None]
    chunk = data[idx].long()  # (B, T)
    bos = torch.full((len(starts), 1), BOS, dtype=torch.long)
    return torch.cat([bos, chunk[:, :-1]], dim=1), chunk


def lm_loss(model: TinyLM, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
