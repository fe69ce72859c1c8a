"""``selattn_ext.distributed``: selective attention on ``torch.distributed`` (gloo or NCCL).

Import it explicitly (``import selattn_ext`` does not); importing needs no initialised process
group. What it provides:

* DTensor sharding strategies for the prefill ops (``_sharding``): ``selattn_ext.attention``
  and ``attention_varlen`` accept DTensors sharded on heads (q_sel/k_sel replicated) or on the
  batch.
* Tensor parallelism (``tp``): :func:`tp_plan` for ``parallelize_module``, the selection head
  broadcast from its owning rank (:func:`broadcast_selection`), decoding through per-rank pruned
  caches (:func:`tp_kv_cache`).
* Context parallelism (``cp``): :func:`context_parallel_attention` on contiguous sequence
  slices, and :func:`enable_context_parallel` for ``SelectiveSelfAttention`` modules.
* Data parallelism needs nothing: FSDP2 (``fully_shard``) and DDP wrap models built from
  ``selattn_ext.nn`` as they are (tested in python_tests/test_distributed.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import _sharding  # noqa: F401  (registers the DTensor strategies)
from ._comm import TRAFFIC, group_rank_world, maybe_group
from .cp import context_parallel_attention
from .tp import broadcast_selection, qkv_row_order, tp_forward, tp_kv_cache, tp_plan

__all__ = ["TRAFFIC", "broadcast_selection", "context_parallel_attention",
           "enable_context_parallel", "qkv_row_order", "tp_kv_cache", "tp_plan"]


def enable_context_parallel(module: nn.Module, group=None, *, block: int = 128) -> nn.Module:
    """Make every ``SelectiveSelfAttention`` in ``module`` run context-parallel over ``group``
    (a ProcessGroup or 1-D DeviceMesh; None: the world): its input x (B, n, E) is then this
    rank's slice ``[rank n, (rank + 1) n)`` of the sequence (RoPE positions offset
    accordingly). Parameters stay replicated: average their gradients over the group after
    backward (each rank's loss covers its own tokens). Prefill/training only (no cache, no
    cu_seqlens, no memory_tau). Returns ``module``."""
    from ..nn import SelectiveSelfAttention

    group = maybe_group(group)
    group_rank_world(group)
    found = False
    for m in module.modules():
        if isinstance(m, SelectiveSelfAttention):
            if not m.selective or m.memory_tau is not None:
                raise ValueError("context parallelism needs selective=True and no memory_tau")
            m._selattn_cp = (group, block)
            found = True
    if not found:
        raise ValueError(f"enable_context_parallel: no SelectiveSelfAttention inside "
                         f"{type(module).__name__}")
    return module


def _cp_forward(attn, x: Tensor, cache=None, *, lengths: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
    group, block = attn._selattn_cp
    if cache is not None or lengths is not None or cu_seqlens is not None:
        raise NotImplementedError("a context-parallel SelectiveSelfAttention supports the "
                                  "prefill/training forward only (no cache, lengths, cu_seqlens)")
    rank, _ = group_rank_world(group)
    b, n, _ = x.shape
    positions = rank * n + torch.arange(n, device=x.device)
    q, k, v = attn._project(x, positions)
    out = context_parallel_attention(q, k, v, group=group, sel_head=attn.sel_head, block=block)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))


def module_forward(attn, x: Tensor, cache=None, **kwargs) -> Tensor:
    """Dispatch of ``SelectiveSelfAttention.forward`` for parallelised modules."""
    if getattr(attn, "_selattn_cp", None) is not None:
        return _cp_forward(attn, x, cache, **kwargs)
    return tp_forward(attn, x, cache, **kwargs)
