"""Differentiable collectives used by the tensor- and context-parallel paths.

Plain ``torch.distributed`` calls inside ``autograd.Function``s, so the same code runs on gloo
(CPU) and NCCL. Each function's backward issues the adjoint collective: every rank must run the
same forward and backward (the usual SPMD contract), or the collectives mismatch.

Every call also adds its payload to :data:`TRAFFIC`: the bytes of the tensor the collective
operates on (broadcast/reduce: that tensor; all_gather: the gathered output; reduce_scatter:
the full input), so bench/distributed.py counts volume from the tensors really exchanged. Bytes
on the wire per rank follow from the algorithm (ring all-gather / reduce-scatter / broadcast:
(W - 1) / W of the payload; all-reduce: twice that).
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["TRAFFIC", "all_gather_along", "broadcast_from"]

#: payload bytes by collective kind ("broadcast", "reduce", "all_gather", "reduce_scatter").
TRAFFIC: Counter = Counter()


def _count(kind: str, nbytes: int) -> None:
    TRAFFIC[kind] += int(nbytes)


class _BroadcastFrom(torch.autograd.Function):
    """Forward: the owner's tensor on every rank. Backward: the sum of every rank's gradient,
    delivered to the owner (a reduce); the other ranks' (empty) inputs get empty gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, shape: Tuple[int, ...], owner: int, group) -> Tensor:
        is_owner = dist.get_rank(group) == owner
        ctx.owner, ctx.group, ctx.is_owner, ctx.in_shape = owner, group, is_owner, x.shape
        buf = x.contiguous().clone() if is_owner else x.new_empty(shape)
        if is_owner and tuple(buf.shape) != tuple(shape):
            raise ValueError(f"broadcast_from: the owner's tensor has shape {tuple(buf.shape)}, "
                             f"expected {tuple(shape)}")
        dist.broadcast(buf, group=group, group_src=owner)
        _count("broadcast", buf.numel() * buf.element_size())
        return buf

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.reduce(grad, group=ctx.group, group_dst=ctx.owner, op=dist.ReduceOp.SUM)
        _count("reduce", grad.numel() * grad.element_size())
        if ctx.is_owner:
            return grad, None, None, None
        return grad.new_zeros(ctx.in_shape), None, None, None


def broadcast_from(x: Tensor, shape: Tuple[int, ...], owner: int, group=None) -> Tensor:
    """The owner rank's ``x`` (of ``shape``) on every rank of ``group``, differentiably.

    On the other ranks ``x`` is only a handle into the autograd graph (any tensor, typically an
    empty slice of an activation): it makes their backward run the matching reduce, which a
    tensor without a grad_fn would skip (and the owner would then wait forever).
    """
    return _BroadcastFrom.apply(x, tuple(shape), owner, group)


def _reduce_scatter_along(grad: Tensor, dim: int, group) -> Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = [c.contiguous() for c in grad.chunk(world, dim=dim)]
    out = torch.empty_like(chunks[rank])
    try:
        dist.reduce_scatter(out, chunks, group=group)
    except (RuntimeError, NotImplementedError, ValueError):
        # gloo has no reduce_scatter: an all-reduce of the whole gradient, then our slice.
        full = grad.contiguous().clone()
        dist.all_reduce(full, group=group)
        _count("reduce_scatter", full.numel() * full.element_size())
        _count("reduce_scatter as all_reduce (gloo)", full.numel() * full.element_size())
        return full.chunk(world, dim=dim)[rank].contiguous()
    _count("reduce_scatter", grad.numel() * grad.element_size())
    return out


class _AllGatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group) -> Tensor:
        ctx.dim, ctx.group = dim, group
        world = dist.get_world_size(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        _count("all_gather", x.numel() * x.element_size() * world)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reduce_scatter_along(grad, ctx.dim, ctx.group), None, None


def all_gather_along(x: Tensor, dim: int, group=None) -> Tensor:
    """Concatenation along ``dim`` of every rank's ``x`` (equal shapes), in rank order;
    backward: the reduce-scatter of the gradient (every rank's contribution to my slice)."""
    return _AllGatherAlong.apply(x, dim, group)


def group_rank_world(group=None) -> Tuple[int, int]:
    """(rank in group, group size); a clear error when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("selattn_ext.distributed needs torch.distributed initialised "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def maybe_group(mesh_or_group) -> Optional[object]:
    """A ProcessGroup from a 1-D DeviceMesh, a ProcessGroup, or None (the default group)."""
    if mesh_or_group is None:
        return None
    if hasattr(mesh_or_group, "get_group"):
        return mesh_or_group.get_group()
    return mesh_or_group
