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

__all__ = ["selection_inputs", "selection_scores", "accumulated_selection", "memory_rowsum",
           "memory", "attention"]


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


def memory_rowsum(f: Tensor, tau: float) -> Tensor:
    """R (B, N) of the memory loss: ``R[b, i] = sum_{j <= i} min(F[b, i, j], tau)``.

    F is already 0 for j > i; the causal mask is applied anyway so the sum is literally the
    one defined. The gradient is 1 where F < tau and 0 from F == tau on (the minimum-norm
    subgradient, like relu's at 0), which the fused backward matches. Written with
    torch.where because torch.clamp's gradient at the bound changed between releases
    (1 up to torch 2.13, 0 from 2.14).
    """
    n = f.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=f.device).tril()
    clipped = torch.where(f < tau, f, torch.full((), tau, dtype=f.dtype, device=f.device))
    return torch.where(causal, clipped, torch.zeros((), dtype=f.dtype, device=f.device)).sum(-1)


def memory(f: Tensor, tau: float) -> Tensor:
    """M (B, N) of the memory loss: ``M[b, i] = (i + 1) - memory_rowsum(F, tau)[b, i] / tau``."""
    n = f.shape[-1]
    count = torch.arange(1, n + 1, dtype=f.dtype, device=f.device)
    return count - memory_rowsum(f, tau) / tau


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
    memory_tau: Optional[float] = None,
    return_f: bool = False,
) -> Union[Tensor, Tuple[Tensor, ...]]:
    """Selective attention, eagerly: same arguments as :func:`selattn_ext.attention`.

    Returns ``out`` (B, Hq, N, D), followed by ``lse`` (B, Hq, N) if ``return_lse``, the
    memory ``M`` (B, N) (:func:`memory`) if ``memory_tau`` is given, and ``F`` (B, N, N) if
    ``return_f``. Computes in the input dtype; pass float64 for an oracle.
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
    if memory_tau is not None:
        extra.append(memory(f, memory_tau))
    if return_f:
        extra.append(f)
    return (out, *extra) if extra else out


# ---------------------------------------------------------------------------------------------
# Pruned KV cache (DESIGN §3), eagerly: a literal loop over sequences with python-side state.
# ---------------------------------------------------------------------------------------------

__all__ += ["ReferenceKVCache"]


class ReferenceKVCache:
    """Executable spec of the pruned KV cache: one layer, every sequence kept as plain tensors.

    Each :meth:`step` call is one step of DESIGN §3 for a chunk of ``c`` new tokens per
    sequence (``lengths[b] <= c`` of them valid). Computes in the dtype of the inputs, with F
    kept in float32 (float64 for float64 inputs). Slow on purpose: no slots, no kernels.
    """

    def __init__(self, budget: int, *, tau: Optional[float] = None, scale: Optional[float] = None,
                 sel_head: int = 0):
        self.budget, self.tau, self.scale, self.sel_head = budget, tau, scale, sel_head
        self.seqs = None  # per sequence: dict(pos=list[int], k, v (Hkv, n, D), f (n,), length)

    def positions(self):
        """Kept positions per sequence, ascending."""
        return [sorted(s["pos"]) for s in self.seqs] if self.seqs else []

    def step(self, q: Tensor, k: Tensor, v: Tensor, lengths=None) -> Tensor:
        bsz, hq, c, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        scale = d ** -0.5 if self.scale is None else self.scale
        sh = self.sel_head % hq
        fdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        if self.seqs is None:
            self.seqs = [dict(pos=[], k=k.new_zeros(hkv, 0, d), v=v.new_zeros(hkv, 0, d),
                              f=torch.zeros(0, dtype=fdt, device=q.device), length=0)
                         for _ in range(bsz)]
        out = torch.zeros_like(q)
        for b, st in enumerate(self.seqs):
            m = c if lengths is None else int(lengths[b])
            big_l = st["length"]
            # 1. add the chunk with F = 0
            pos = st["pos"] + list(range(big_l, big_l + m))
            kk = torch.cat([st["k"], k[b, :, :m]], dim=1)
            vv = torch.cat([st["v"], v[b, :, :m]], dim=1)
            f = torch.cat([st["f"], torch.zeros(m, dtype=fdt, device=q.device)])
            p = torch.tensor(pos, device=q.device)
            qpos = big_l + torch.arange(m, device=q.device)
            # S[t, j] by positions, and the within-chunk exclusive prefix for query t
            a = scale * (q[b, sh, :m] @ kk[sh // g].transpose(0, 1))
            sel = (p[None, :] > 0) & (p[None, :] < qpos[:, None])
            s = torch.where(sel, torch.relu(a), torch.zeros((), dtype=a.dtype, device=a.device))
            s = s.to(fdt)
            before = torch.cumsum(s, dim=0) - s
            # 2. attention of every new query over C with pos(j) <= pos(i)
            logits = scale * (q[b, :, :m] @ kk.repeat_interleave(g, dim=0).transpose(-1, -2))
            logits = logits - (f[None, :] + before).to(logits.dtype)[None]
            logits = logits.masked_fill(p[None, None, :] > qpos[None, :, None], float("-inf"))
            out[b, :, :m] = torch.softmax(logits, dim=-1) @ vv.repeat_interleave(g, dim=0)
            # 3. F update
            f = f + s.sum(dim=0)
            # 4. eviction: tau first, then the largest F while over budget (ties: oldest)
            keep = [True] * len(pos)
            if self.tau is not None:
                for j in range(len(pos)):
                    if pos[j] != 0 and float(f[j]) > self.tau:
                        keep[j] = False
            while sum(keep) > self.budget:
                cand = [j for j in range(len(pos)) if keep[j] and pos[j] != 0]
                victim = max(cand, key=lambda j: (float(f[j]), -pos[j]))
                keep[victim] = False
            idx = torch.tensor([j for j in range(len(pos)) if keep[j]], dtype=torch.long,
                               device=q.device)
            st.update(pos=[pos[j] for j in idx.tolist()], k=kk[:, idx], v=vv[:, idx], f=f[idx],
                      length=big_l + m)
        return out
