"""The paper's auxiliary memory loss, which trains a model to be prunable (Leviathan et al.).

Per layer, with F the accumulated selection of DESIGN §1 and a clip level ``tau > 0``,

    M[b, i] = (i + 1) - sum_{j <= i} min(F[b, i, j], tau) / tau

counts the tokens query i still attends to if a token is masked in proportion to F / tau and
fully once F >= tau. The maximum of M over i is the KV memory a pruned cache would need for
that sequence, so minimising it teaches the model to mask tokens it no longer needs.

:func:`selattn_ext.attention` with ``memory_tau`` returns M, from row sums computed inside the
fused kernel; :func:`memory_loss` combines the layers.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["memory_from_rowsum", "memory_loss"]


def memory_from_rowsum(rowsum: Tensor, tau: float) -> Tensor:
    """M (B, N) from ``R[b, i] = sum_{j <= i} min(F[b, i, j], tau)`` (B, N)."""
    # (i + 1) as a cumsum of ones_like: stays a DTensor with rowsum's placement (batch-sharded
    # or replicated) when rowsum is one, where a fresh arange would be a plain tensor.
    count = torch.ones_like(rowsum).cumsum(-1)
    return count - rowsum / tau


def memory_loss(memories: Sequence[Tensor]) -> Tensor:
    """L_mem: the mean, over layers and over the batch, of ``max_i M[b, i]``.

    Args:
        memories: one M (B, N) per layer, e.g. the third output of
            ``selattn_ext.attention(..., return_lse=True, memory_tau=tau)`` or the
            ``last_memory`` of each :class:`selattn_ext.nn.SelectiveSelfAttention` built with
            ``memory_tau``. All layers need the same B.

    Returns:
        A scalar in the dtype of M. Normalisation: a sum over layers and batch elements
        divided by their count, *not* by N: the loss is in tokens (it is at most N, the memory
        of unpruned attention), so a weight chosen for one context length should be rescaled
        (e.g. divided by N) when the length changes. Add it to the language-model loss with a
        small weight; its gradient reaches q_sel / k_sel (the selection head) only.
    """
    memories = list(memories)
    if not memories:
        raise ValueError("memory_loss needs at least one layer's M, got an empty sequence")
    for idx, m in enumerate(memories):
        if m.dim() != 2:
            raise ValueError(f"memories[{idx}] must be 2-D (B, N), got shape {tuple(m.shape)}")
        if m.shape[0] != memories[0].shape[0]:
            raise ValueError(f"memories[{idx}] has batch size {m.shape[0]}, expected "
                             f"{memories[0].shape[0]} (that of memories[0])")
    # amax's gradient splits evenly between tied maxima (max would pick one arbitrarily).
    return torch.stack([m.amax(dim=-1) for m in memories]).mean()
