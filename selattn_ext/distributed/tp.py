"""Tensor parallelism (heads sharded over ranks) for ``selattn_ext.nn.SelectiveSelfAttention``.

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from selattn_ext.distributed import tp_plan

    mesh = init_device_mesh("cuda", (world,))        # "cpu" with gloo
    parallelize_module(model, mesh, tp_plan(model))  # every SelectiveSelfAttention inside

Each rank keeps ``num_heads / world`` query heads and ``num_kv_heads / world`` kv heads (both
must divide; GQA groups never straddle ranks): the fused qkv projection is sharded column-wise
(its rows are first regrouped so that every rank's shard holds its own q, k and v heads), the
output projection row-wise (one all-reduce of the (B, N, E) output, as in any Megatron-style
attention).

**The selection head.** One head's logits build F, which masks every head, so F is needed on
every rank but the selection head lives on one (the *owner*). Its rank computes q_sel / k_sel
(B, N, D each, after RoPE) as usual and **broadcasts** them; every rank then runs the fused
kernel on its own heads with identical F. In the backward each rank's share of dq_sel / dk_sel
(its heads' gradient through F) is **reduced** (summed) onto the owner. Traffic per layer: a
2 B N D payload forward and 2 B N D backward, next to the B N E all-reduces (output forward,
input gradient backward) that plain TP attention already pays: 2 / num_heads more payload,
1 / num_heads more bytes on the wire (an all-reduce moves twice its payload, a broadcast or
reduce once).

Why a broadcast of activations and not a replicated copy of the selection head's projection
rows on every rank: (a) the copy would be a second parameter that must stay tied to rows of
the sharded qkv weight (its gradient, from every rank, still has to be reduced onto the owner
every step, 2 D E elements), so it saves no synchronisation, only swaps what is sent;
(b) in decoding the broadcast moves 2 B D elements per token per layer while re-broadcasting
the rows would move 2 D E, far more; (c) it is exact: nothing is recomputed, so F is bitwise
identical on every rank, which the pruned cache's eviction (argmax F) relies on. For training
with B N > E a rows-broadcast would move less (2 D E vs 2 B N D); at 1 / H of the wire bytes
already paid for the all-reduces, the difference is small, and one code path serves training
and decoding.

**Decoding.** :func:`tp_kv_cache` builds each rank's :class:`~selattn_ext.SelectiveKVCache`
with its ``num_kv_heads / world`` kv heads plus one slot-row for the selection key, so every
rank updates F (and evicts) identically from the broadcast q_sel / k_sel of the new tokens.
Cost: one extra kv head per rank in the cache and ``num_heads / num_kv_heads`` extra query
rows in the step (their outputs are discarded).

**Hugging Face recipe** (``selattn_ext.integrations.transformers``; not exercised by the tests
here). HF's own ``tp_plan="auto"`` shards ``q_proj``/``k_proj``/``v_proj`` colwise and
``o_proj`` rowwise, so the registered ``"selective"`` attention function receives this rank's
heads only. Wrap it so it builds the selection inputs with :func:`broadcast_selection` and
passes them explicitly::

    from selattn_ext.distributed import broadcast_selection
    def tp_selective(module, query, key, value, attention_mask, scaling=None, **kw):
        q_sel, k_sel = broadcast_selection(query, key, sel_head=0, num_heads=module.config.num_attention_heads)
        out = selattn_ext.attention(query, key, value, q_sel=q_sel, k_sel=k_sel, scale=scaling)
        return out.transpose(1, 2), None
    transformers.AttentionInterface.register("selective_tp", tp_selective)

(the pruned cache would need the extra selection head of :func:`tp_kv_cache` as well).

Limitations: packed sequences (``cu_seqlens``) are not supported under TP yet; checkpoints of a
parallelized model store the qkv rows in the regrouped order (``qkv_row_order`` maps them back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from ..attention import attention
from ..cache import SelectiveKVCache, decode
from ._comm import broadcast_from, group_rank_world

__all__ = ["broadcast_selection", "qkv_row_order", "tp_kv_cache", "tp_plan"]


def qkv_row_order(num_heads: int, num_kv_heads: int, head_dim: int, world: int) -> Tensor:
    """Row permutation of the fused qkv weight used under TP: ``w_tp = w[order]``.

    Rank r's contiguous 1/world of the rows is [its q heads, its k heads, its v heads];
    ``w[order] -> w`` is undone by ``w_tp[order.argsort()]``.
    """
    for name, h in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if h % world:
            raise ValueError(f"tensor parallelism over {world} ranks needs {name} ({h}) "
                             f"divisible by {world}")
    hl, kvl = num_heads // world, num_kv_heads // world
    k0, v0 = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    parts: List[Tensor] = []
    for r in range(world):
        parts.append(torch.arange(r * hl * head_dim, (r + 1) * hl * head_dim))
        parts.append(k0 + torch.arange(r * kvl * head_dim, (r + 1) * kvl * head_dim))
        parts.append(v0 + torch.arange(r * kvl * head_dim, (r + 1) * kvl * head_dim))
    return torch.cat(parts)


@dataclass
class _TPInfo:
    group: object
    rank: int
    world: int
    local_heads: int
    local_kv_heads: int


class _FusedQKVColwise(ColwiseParallel):
    """ColwiseParallel for the fused qkv projection: rows regrouped per rank first."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def _partition_linear_fn(self, name, module, device_mesh):
        order = qkv_row_order(self.heads, self.kv_heads, self.head_dim, device_mesh.size())
        with torch.no_grad():
            for pname, param in list(module.named_parameters(recurse=False)):
                param.data = param.data[order.to(param.device)].contiguous()
        return super()._partition_linear_fn(name, module, device_mesh)

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if device_mesh.ndim != 1:
            raise ValueError("tp_plan: give parallelize_module the 1-D tensor-parallel mesh "
                             "(e.g. mesh['tp'])")
        world = device_mesh.size()
        qkv_row_order(self.heads, self.kv_heads, self.head_dim, world)  # divisibility check
        out = super()._apply(module, device_mesh)
        group = device_mesh.get_group()
        module._selattn_tp = _TPInfo(group, device_mesh.get_local_rank(), world,
                                     self.heads // world, self.kv_heads // world)
        return out


def tp_plan(module: nn.Module) -> Dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan for every ``SelectiveSelfAttention`` in ``module``
    (the module itself included): ``{"<path>.qkv": fused colwise, "<path>.out_proj":
    RowwiseParallel()}``. Other layers (MLPs, embeddings) are left to the caller's own plan;
    merge the dicts."""
    from ..nn import SelectiveSelfAttention

    plan: Dict[str, ParallelStyle] = {}
    for path, m in module.named_modules():
        if isinstance(m, SelectiveSelfAttention):
            prefix = f"{path}." if path else ""
            plan[prefix + "qkv"] = _FusedQKVColwise(m.num_heads, m.num_kv_heads, m.head_dim)
            plan[prefix + "out_proj"] = RowwiseParallel()
    if not plan:
        raise ValueError(f"tp_plan: no SelectiveSelfAttention inside {type(module).__name__}")
    return plan


def broadcast_selection(q: Tensor, k: Tensor, sel_head: int, num_heads: int,
                        group=None) -> Tuple[Tensor, Tensor]:
    """(q_sel, k_sel), each (B, N, D), on every rank, from the rank holding ``sel_head``.

    Args:
        q: (B, Hq / world, N, D) this rank's query heads (heads sharded in contiguous blocks:
            rank r holds heads ``r * Hq / world ...``), after RoPE.
        k: (B, Hkv / world, N, D) this rank's kv heads.
        sel_head: the selection head's global index (negative counts from the end).
        num_heads: Hq, the global number of query heads.
        group: the tensor-parallel process group (default: the world).

    Differentiable: the backward sums every rank's gradient onto the owner (2 B N D elements
    each way).
    """
    rank, world = group_rank_world(group)
    hl = q.shape[1]
    if hl * world != num_heads:
        raise ValueError(f"q has {hl} local heads; {world} ranks x {hl} != num_heads "
                         f"({num_heads})")
    g = hl // k.shape[1]
    sh = sel_head % num_heads
    owner, local = divmod(sh, hl)
    b, _, n, d = q.shape
    if rank == owner:
        handle = torch.stack([q[:, local], k[:, local // g]])
    else:
        handle = q[:, :0, :0, :0].reshape(0)  # empty, but inside the autograd graph
    sel = broadcast_from(handle, (2, b, n, d), owner, group)
    return sel[0], sel[1]


def tp_kv_cache(attn: nn.Module, batch_size: int, budget: int, **kwargs) -> SelectiveKVCache:
    """This rank's pruned cache for a tensor-parallel ``SelectiveSelfAttention``: its
    ``num_kv_heads / world`` kv heads plus one for the selection key (see the module doc).
    ``kwargs`` go to :class:`~selattn_ext.SelectiveKVCache` (max_chunk, tau, dtype, device)."""
    info = _info(attn)
    return SelectiveKVCache(batch_size, info.local_kv_heads + 1, attn.head_dim, budget, **kwargs)


def _info(attn: nn.Module) -> _TPInfo:
    info = getattr(attn.qkv, "_selattn_tp", None)
    if info is None:
        raise ValueError("this SelectiveSelfAttention is not tensor-parallel (apply "
                         "parallelize_module(model, mesh, tp_plan(model)) first)")
    return info


def _project_local(attn, x: Tensor, positions: Tensor, info: _TPInfo):
    b, n, _ = x.shape
    hl, kvl = info.local_heads, info.local_kv_heads
    qkv = attn.qkv(x).view(b, n, hl + 2 * kvl, attn.head_dim)
    q, k, v = qkv.split([hl, kvl, kvl], dim=2)
    if attn.rotary is not None:
        q, k = attn.rotary(q, positions), attn.rotary(k, positions)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def tp_forward(attn, x: Tensor, cache=None, *, lengths: Optional[Tensor] = None,
               cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
    """``SelectiveSelfAttention.forward`` once its projections are tensor-parallel."""
    info = _info(attn)
    if cu_seqlens is not None:
        raise NotImplementedError("packed sequences (cu_seqlens) are not supported under "
                                  "tensor parallelism yet; use a padded batch")
    b, n, _ = x.shape
    if cache is None:
        if lengths is not None:
            raise ValueError("lengths is only meaningful with a cache")
        q, k, v = _project_local(attn, x, torch.arange(n, device=x.device), info)
        if attn.selective:
            q_sel, k_sel = broadcast_selection(q, k, attn.sel_head, attn.num_heads, info.group)
            if attn.memory_tau is not None:
                out, mem = attention(q, k, v, q_sel=q_sel, k_sel=k_sel,
                                     memory_tau=attn.memory_tau)
                # Every rank computes the same M; only the owner's copy carries the gradient,
                # else the reduce onto the owner would count the memory loss once per rank.
                owner = (attn.sel_head % attn.num_heads) // info.local_heads
                attn.last_memory = mem if info.rank == owner else mem.detach()
            else:
                out = attention(q, k, v, q_sel=q_sel, k_sel=k_sel)
        else:
            g = info.local_heads // info.local_kv_heads
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1),
                                                 v.repeat_interleave(g, dim=1), is_causal=True)
    elif not attn.selective:
        raise ValueError("a SelectiveKVCache needs selective=True")
    else:
        attn.last_memory = None
        out = _tp_decode(attn, x, cache, lengths, info)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, info.local_heads * attn.head_dim))


def _tp_decode(attn, x: Tensor, cache: SelectiveKVCache, lengths, info: _TPInfo) -> Tensor:
    if cache.num_kv_heads != info.local_kv_heads + 1:
        raise ValueError(f"under tensor parallelism the cache needs this rank's "
                         f"{info.local_kv_heads} kv heads + 1 for the selection key = "
                         f"{info.local_kv_heads + 1} heads, got {cache.num_kv_heads}; build it "
                         f"with selattn_ext.distributed.tp_kv_cache")
    b = x.shape[0]
    g = info.local_heads // info.local_kv_heads
    outs = []
    for start in range(0, x.shape[1], cache.max_chunk):
        chunk = x[:, start:start + cache.max_chunk]
        c = chunk.shape[1]
        chunk_lengths = None
        if lengths is not None:
            chunk_lengths = (torch.as_tensor(lengths, device=x.device) - start).clamp(0, c)
        seen = torch.as_tensor(cache.seq_lengths, device=x.device).view(b, 1)
        q, k, v = _project_local(attn, chunk, seen + torch.arange(c, device=x.device), info)
        q_sel, k_sel = broadcast_selection(q, k, attn.sel_head, attn.num_heads, info.group)
        # One extra kv head (the selection key, zero values) read by g query rows: the first
        # is q_sel, the step's selection head; the others only pad the group.
        q2 = torch.cat([q_sel[:, None], q_sel.new_zeros(b, g - 1, c, q.shape[-1]), q], dim=1)
        k2 = torch.cat([k_sel[:, None], k], dim=1)
        v2 = torch.cat([torch.zeros_like(k_sel)[:, None], v], dim=1)
        out = decode(q2.contiguous(), k2.contiguous(), v2.contiguous(), cache, sel_head=0,
                     lengths=chunk_lengths)
        outs.append(out[:, g:])
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
