"""Context parallelism: each rank holds a contiguous slice of the sequence (prefill/training).

    out = context_parallel_attention(q, k, v, group=cp_group)  # q/k/v: this rank's rows

Rank r of W holds rows ``[r n, (r + 1) n)`` of every sequence (equal slices). As in
torchtitan's all-gather context parallelism, keys, values and the selection keys are
all-gathered; queries stay local. F (DESIGN §1) needs, for row i of rank r and key j,

    F[i, j] = C_r[j] + sum_{r n <= k < i} S[k, j],     C_r[j] = sum_{r' < r} colsum_{r'}[j],

where ``colsum_{r'}[j] = sum_{k in rank r'} S[k, j]``: an exclusive scan across ranks of one
N-vector per rank and batch element. Each rank computes the column sums of its own rows' S
(against the gathered selection keys), the vectors are all-gathered and summed over earlier
ranks, and then every rank attends with its F offset: no rank recomputes another rank's
selection scores. The backward is the exact adjoint: the all-gathers' backward are
reduce-scatters, which carry dk, dv, dk_sel and the gradient of each C_r back to the ranks
that own the rows.

**Cost, honestly.** The fused kernels take F from row 0 of their own q/k and have no F-offset /
row-offset input, so this path does not call them: it is a blocked composition of torch ops
(``block`` query rows at a time against the ``r n + block`` visible keys; F built per block from
the offset and a running column sum) with activation checkpointing per block, so memory stays
O(B H block N) per rank and the backward recomputes each block (about 2x the forward's FLOPs on
top of the backward's). It is exact (to round-off) but slower per FLOP than the fused kernel;
an F-offset input in the kernels would remove that gap. Work is as imbalanced as causal
all-gather CP always is (rank r's rows see (r + 1) n keys); a zig-zag slice assignment would
balance it and is not implemented.

Communication per layer, forward: all-gathers of k and v (payload 2 B Hkv N D elements), of
k_sel (B N D) and of the column sums (W B N, fp32 or fp64); backward: the matching
reduce-scatters (on gloo, which has none, an all-reduce of the full gradient). Plain
attention's all-gather CP moves the same k/v; the selection adds B N (D + W) elements each
way, a fraction (D + W) / (2 Hkv D) of it (13% at Hkv = 4, D = 32, W = 2).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..reference import selection_inputs
from ._comm import all_gather_along, group_rank_world

__all__ = ["context_parallel_attention"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _selection_block(qs: Tensor, ks: Tensor, i0: int, scale: float) -> Tensor:
    """S of rows i0 .. i0 + len(qs) - 1 against keys 0 .. ks.size(1) - 1, in acc dtype."""
    acc = _acc_dtype(qs.dtype)
    a = scale * torch.matmul(qs.to(acc), ks.to(acc).transpose(-1, -2))  # (B, bl, Lk)
    i = torch.arange(i0, i0 + qs.shape[1], device=qs.device)[:, None]
    j = torch.arange(ks.shape[1], device=qs.device)[None]
    return torch.relu(a) * ((j >= 1) & (j < i)).to(acc)


def _colsum_block(qs: Tensor, ks: Tensor, i0: int, scale: float) -> Tensor:
    return _selection_block(qs, ks, i0, scale).sum(1)


def _attend_block(q: Tensor, qs: Tensor, k: Tensor, v: Tensor, ks: Tensor, offset: Tensor,
                  i0: int, scale: float) -> Tuple[Tensor, Tensor]:
    """Rows i0 .. i0 + bl - 1 (global) against keys 0 .. i0 + bl - 1.

    ``offset`` (B, Lk): F of the block's first row (the earlier ranks' scan plus the column sums
    of this rank's earlier blocks). Returns (out (B, Hq, bl, D) in q's dtype, this block's
    column sums (B, Lk))."""
    b, hq, bl, d = q.shape
    hkv = k.shape[1]
    lk = i0 + bl
    acc = _acc_dtype(q.dtype)
    s = _selection_block(qs, ks[:, :lk], i0, scale)
    f = offset[:, None, :lk] + (s.cumsum(1) - s)  # exclusive in-block cumsum
    qg = q.to(acc).view(b, hkv, hq // hkv, bl, d)
    logits = scale * torch.matmul(qg, k[:, :, None, :lk].to(acc).transpose(-1, -2))
    logits = logits - f[:, None, None]
    i = torch.arange(i0, lk, device=q.device)[:, None]
    j = torch.arange(lk, device=q.device)[None]
    logits = logits.masked_fill(j > i, float("-inf"))
    out = torch.matmul(torch.softmax(logits, dim=-1), v[:, :, None, :lk].to(acc))
    return out.reshape(b, hq, bl, d).to(q.dtype), s.sum(1)


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None,
                               scale: Optional[float] = None, sel_head: int = 0,
                               q_sel: Optional[Tensor] = None, k_sel: Optional[Tensor] = None,
                               block: int = 128) -> Tensor:
    """Selective attention over a sequence split across the ranks of ``group``.

    Args:
        q: (B, Hq, n, D) this rank's queries: rows ``[rank * n, (rank + 1) * n)`` of the
            sequence (every rank holds the same n; rank 0's first row is the BOS).
        k, v: (B, Hkv, n, D) the same rows' keys and values.
        group: the context-parallel process group (a ProcessGroup, or None for the world).
        scale, sel_head, q_sel, k_sel: as in :func:`selattn_ext.attention`; q_sel/k_sel are
            this rank's (B, n, D) rows.
        block: query rows per step (memory O(B Hq block N)).

    Returns:
        out (B, Hq, n, D): this rank's rows of ``selattn_ext.attention`` on the whole sequence.
        Differentiable (q, k, v, q_sel, k_sel), with the communication of the module doc.
    """
    rank, world = group_rank_world(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, n, D), got {t.dim()}-D")
    b, hq, n, d = q.shape
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"q.size(1) = {hq} must be a multiple of k.size(1) = {k.shape[1]}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if scale is None:
        scale = d ** -0.5
    if (q_sel is None) != (k_sel is None):
        raise ValueError("q_sel and k_sel must be given together")
    if q_sel is None:
        q_sel, k_sel = selection_inputs(q, k, sel_head)
    a = rank * n
    # Keys beyond this rank's rows are never visible to them: gather all (one collective, as
    # torchtitan does), use the first a + n.
    k_all = all_gather_along(k, 2, group)[:, :, :a + n]
    v_all = all_gather_along(v, 2, group)[:, :, :a + n]
    ks_all = all_gather_along(k_sel, 1, group)[:, :a + n]
    acc = _acc_dtype(q.dtype)

    # This rank's column sums of S (keys < a + n), checkpointed per block: S is never stored.
    col = q.new_zeros((b, a + n), dtype=acc)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        part = checkpoint(_colsum_block, q_sel[:, r0:r1], ks_all[:, :a + r1], a + r0, scale,
                          use_reentrant=False)
        col = col + F.pad(part, (0, n - r1))
    # Exclusive scan across ranks: gather every rank's (B, W n) vector, sum the earlier ones.
    full = F.pad(col, (0, world * n - (a + n)))
    every = all_gather_along(full[None], 0, group)  # (W, B, W n)
    # Rank 0 sums nothing, but through the gather all the same: every rank's backward must run
    # the gather's reduce-scatter, or the collectives of the ranks mismatch.
    offset = every[:rank].sum(0)[:, :a + n]

    outs = []
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        out, s_sum = checkpoint(_attend_block, q[:, :, r0:r1], q_sel[:, r0:r1], k_all, v_all,
                                ks_all, offset, a + r0, scale, use_reentrant=False)
        outs.append(out)
        offset = offset + F.pad(s_sum, (0, n - r1))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
