"""DTensor sharding strategies for the ``torch.ops.selattn`` prefill ops.

Registered with :func:`torch.distributed.tensor.experimental.register_sharding` when
``selattn_ext.distributed`` is imported, so ``selattn_ext.attention`` / ``attention_varlen``
(and their autograd) accept DTensors instead of failing with "does not have a sharding strategy
registered". Strategies offered (DTensor picks the one needing the least redistribution):

* **heads** (tensor parallelism): q, k, v, out, lse, dout, dlse sharded on the head dimension;
  q_sel / k_sel (and ``cu_seqlens``) replicated. The forward's F, and so ``mem``, is the same
  on every rank (Replicate). The backward's dq_sel / dk_sel come out ``Partial`` (each rank
  holds its heads' share of the gradient through F); an incoming ``dmem`` must be ``Partial``
  so the memory-loss term is counted once, not once per rank. Offered only when the mesh size
  divides Hq and Hkv, so each rank's query heads read only its own kv heads (GQA).
* **batch** (dense ops only; data parallelism on DTensors): every tensor sharded on dim 0.
* **replicate**: everything replicated (the fallback DTensor can always reach).

The selection inputs must be given explicitly (``q_sel=``/``k_sel=``) as replicated DTensors:
``sel_head=`` on a head-sharded q would slice across the sharded dimension, which DTensor can
only do by gathering every head. :func:`selattn_ext.distributed.broadcast_selection` builds them
from the owning rank with O(B x N x D) traffic.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

__all__: list = []

_ops = torch.ops.selattn


def _heads_divisible(q_spec, k_spec, head_dim: int) -> bool:
    world = q_spec.mesh.size()
    return q_spec.shape[head_dim] % world == 0 and k_spec.shape[head_dim] % world == 0


def _opt(placement, arg):
    return None if arg is None else placement


@register_sharding(_ops.prefill_fwd.default)
def _prefill_fwd_sharding(q, k, v, q_sel, k_sel, scale, mem_tau=None):
    R = Replicate()
    mem_batch = Shard(0) if mem_tau is not None else R  # the placeholder is (0,)
    rules = [([R, R, R], [R, R, R, R, R, None, None]),
             ([Shard(0), Shard(0), mem_batch],
              [Shard(0), Shard(0), Shard(0), Shard(0), Shard(0), None, None])]
    if _heads_divisible(q, k, 1):
        rules.append(([Shard(1), Shard(1), R], [Shard(1), Shard(1), Shard(1), R, R, None, None]))
    return rules


@register_sharding(_ops.prefill_bwd.default)
def _prefill_bwd_sharding(dout, q, k, v, q_sel, k_sel, out, lse, dlse, scale, dmem=None,
                          mem_tau=None):
    R, S0, S1 = Replicate(), Shard(0), Shard(1)
    rules = [([R] * 5, [R, R, R, R, R, R, R, R, _opt(R, dlse), None, _opt(R, dmem), None]),
             ([S0] * 5, [S0, S0, S0, S0, S0, S0, S0, S0, _opt(S0, dlse), None, _opt(S0, dmem),
                         None])]
    if _heads_divisible(q, k, 1):
        rules.append(([S1, S1, S1, Partial(), Partial()],
                      [S1, S1, S1, S1, R, R, S1, S1, _opt(S1, dlse), None,
                       _opt(Partial(), dmem), None]))
    return rules


@register_sharding(_ops.prefill_varlen_fwd.default)
def _prefill_varlen_fwd_sharding(q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, scale,
                                 mem_tau=None):
    R = Replicate()
    rules = [([R, R, R], [R, R, R, R, R, R, None, None, None])]
    if _heads_divisible(q, k, 1):
        # q/k/v/out (total, H, D): heads on dim 1; lse (H, total): heads on dim 0.
        rules.append(([Shard(1), Shard(0), R], [Shard(1), Shard(1), Shard(1), R, R, R, None,
                                                None, None]))
    return rules


@register_sharding(_ops.prefill_varlen_bwd.default)
def _prefill_varlen_bwd_sharding(dout, q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, out, lse,
                                 dlse, scale, dmem=None, mem_tau=None):
    R, S0, S1 = Replicate(), Shard(0), Shard(1)
    rules = [([R] * 5, [R, R, R, R, R, R, R, None, R, R, _opt(R, dlse), None, _opt(R, dmem),
                        None])]
    if _heads_divisible(q, k, 1):
        rules.append(([S1, S1, S1, Partial(), Partial()],
                      [S1, S1, S1, S1, R, R, R, None, S1, S0, _opt(S0, dlse), None,
                       _opt(Partial(), dmem), None]))
    return rules
