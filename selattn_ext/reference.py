"""Eager oracle for selective attention: DESIGN §1, materialised literally (N x N).

This module is the executable spec. Every fused path (CPU, CUDA, decode, chunked) is tested
against it in float64. It computes in the dtype it is given, so the tests also use it as the
"same math in low precision" baseline of the FlashAttention tolerance rule.

    A[i,j]   = s * q_sel[i] . k_sel[j]
    S[i,j]   = relu(A[i,j])  if 1 <= j < i  else 0      (no BOS, no self, no future)
    F[i,j]   = sum_{k < i} S[k,j]                       (exclusive cumsum down the queries)
    L_h[i,j] = s * q[h,i] . k[h//g,j] - F[i,j]  for j <= i,  -inf for j > i
    out[h,i] = softmax_j(L_h[i,:]) @ v[h//g];   lse[h,i] = logsumexp_j L_h[i,:]
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["selection_inputs", "selection_scores", "accumulated_selection", "attention"]


def selection_inputs(q: Tensor, k: Tensor, sel_head: int = 0) -> Tuple[Tensor, Tensor]:
    """(q_sel, k_sel) for a selection head: ``q[:, sel_head]`` and its kv head ``k[:, sel_head // g]``.

    Negative ``sel_head`` counts from the end, as in Python indexing. Returns views (no copy),
    so gradients reach ``q`` and ``k`` through them.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if not -hq <= sel_head < hq:
        raise ValueError(f"sel_head must be in [-{hq}, {hq}) for {hq} query heads, got {sel_head}")
    sh = sel_head % hq
    # sh * hkv // hq == sh // g whenever hq % hkv == 0 (checked by the op), and never divides by 0.
    return q[:, sh], k[:, sh * hkv // hq]


def selection_scores(q_sel: Tensor, k_sel: Tensor, scale: float) -> Tensor:
    """S (B, N, N): ``relu(scale * q_sel @ k_sel^T)`` where ``1 <= j < i``, else 0."""
    n = q_sel.shape[-2]
    a = scale * (q_sel @ k_sel.transpose(-1, -2))
    i = torch.arange(n, device=q_sel.device)[:, None]
    j = torch.arange(n, device=q_sel.device)[None, :]
    keep = (j >= 1) & (j < i)
    return torch.where(keep, torch.relu(a), torch.zeros((), dtype=a.dtype, device=a.device))


def accumulated_selection(q_sel: Tensor, k_sel: Tensor, scale: float) -> Tensor:
    """F (B, N, N): ``F[i, j] = sum_{k < i} S[k, j]`` (exclusive cumulative sum over queries)."""
    s = selection_scores(q_sel, k_sel, scale)
    inclusive = s.cumsum(dim=-2)
    return torch.cat([torch.zeros_like(inclusive[..., :1, :]), inclusive[..., :-1, :]], dim=-2)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    sel_head: int = 0,
    q_sel: Optional[Tensor] = None,
    k_sel: Optional[Tensor] = None,
    return_lse: bool = False,
    return_f: bool = False,
) -> Union[Tensor, Tuple[Tensor, ...]]:
    """Selective attention, eagerly: same arguments as :func:`selattn_ext.attention`.

    Returns ``out`` (B, Hq, N, D), followed by ``lse`` (B, Hq, N) if ``return_lse`` and ``F``
    (B, N, N) if ``return_f``. Computes in the input dtype; pass float64 for an oracle.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if (q_sel is None) != (k_sel is None):
        raise ValueError("q_sel and k_sel must be given together")
    if q_sel is None:
        q_sel, k_sel = selection_inputs(q, k, sel_head)
    n = q.shape[-2]
    g = q.shape[1] // k.shape[1]
    f = accumulated_selection(q_sel, k_sel, scale)
    kk = k.repeat_interleave(g, dim=1)
    vv = v.repeat_interleave(g, dim=1)
    logits = scale * (q @ kk.transpose(-1, -2)) - f[:, None]
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    logits = logits.masked_fill(future, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ vv
    extra = []
    if return_lse:
        extra.append(torch.logsumexp(logits, dim=-1))
    if return_f:
        extra.append(f)
    return (out, *extra) if extra else out
