"""KV-cache eviction baselines for plain (non-selective) attention, eager reference code.

These are the methods users apply to a normal model instead of training with selective
attention; ``bench/quality.py`` compares them with the selective model's pruned cache at equal
memory. Baselines, not product: written for clarity, O(N^2) logits per layer, one Python step
per token.

Budget semantics are those of ``selattn_ext.SelectiveKVCache``: after each token's step a layer
keeps at most ``budget`` tokens, so query i attends to at most ``budget`` kept tokens plus
itself; then the policy evicts down to ``budget``.

- ``streaming``: StreamingLLM, Xiao et al., "Efficient Streaming Language Models with Attention
  Sinks" (ICLR 2024, arXiv 2309.17453): the first ``sinks`` tokens (4) plus the most recent
  ones. Static, so it is computed as one masked attention (:func:`streaming_mask`); the
  step-by-step form (``policy="streaming"`` in :func:`evicting_attention`) is kept as a check.
- ``h2o``: H2O, Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
  Large Language Models" (NeurIPS 2023, arXiv 2306.14048): per head, a recent window of
  ``budget // 2`` tokens plus the "heavy hitters" with the largest attention mass accumulated
  over all queries so far; evicts the lowest accumulated mass outside the recent window.
- ``tova``: TOVA, Oren et al., "Transformers are Multi-State RNNs" (EMNLP 2024, arXiv
  2401.06104): one set per layer; evicts the token (the new one included) with the lowest
  attention weight from the current query, averaged over heads.
"""

from __future__ import annotations

import statistics
from typing import Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

POLICIES = ("streaming", "h2o", "tova")
SINKS = 4


def streaming_mask(n: int, budget: int, sinks: int = SINKS, device=None) -> Tensor:
    """(n, n) bool: query i sees the first ``min(sinks, budget)`` tokens and the
    ``budget - sinks`` tokens before it, plus itself — what a StreamingLLM cache of ``budget``
    tokens holds after step i - 1."""
    s = min(sinks, budget)
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & ((j < s) | (j >= i - (budget - s)))


def evicting_attention(q: Tensor, k: Tensor, v: Tensor, budget: int, policy: str,
                       sinks: int = SINKS) -> Tensor:
    """Causal attention of q (B, H, N, D) over k, v (B, H, N, D) (kv heads already repeated)
    where each query sees only what the policy's cache holds; returns (B, H, N, D)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    b, h, n, d = q.shape
    if policy == "streaming" and budget >= n:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
    logits = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * d ** -0.5  # (B, H, N, N)
    vf = v.to(acc)
    per_head = policy == "h2o"
    kept = torch.zeros(b, h if per_head else 1, n, dtype=torch.bool, device=q.device)
    mass = torch.zeros(b, h, n, dtype=acc, device=q.device)  # H2O: attention received so far
    out = torch.empty(b, h, n, v.shape[-1], dtype=acc, device=q.device)
    recent = budget // 2
    s = min(sinks, budget)
    for i in range(n):
        kept[..., i] = True
        vis = kept[..., :i + 1]
        p = torch.softmax(logits[:, :, i, :i + 1].masked_fill(~vis, float("-inf")), dim=-1)
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", p, vf[:, :, :i + 1])
        if i + 1 <= budget:  # every row holds i + 1 tokens, none to evict yet
            if per_head:
                mass[..., :i + 1] += p
            continue
        if policy == "streaming":  # the oldest non-sink (>= s since i >= budget)
            kept[..., i - budget + s] = False
            continue
        if policy == "tova":
            score = p.mean(dim=1, keepdim=True)  # (B, 1, i + 1), head-averaged
            score = score.masked_fill(~vis, float("inf"))
        else:  # h2o: lowest accumulated mass, recent window protected
            mass[..., :i + 1] += p
            score = mass[..., :i + 1].masked_fill(~vis, float("inf")).clone()
            score[..., i + 1 - recent:] = float("inf")
        victim = score.argmin(dim=-1, keepdim=True)  # (B, G, 1)
        kept[..., :i + 1].scatter_(-1, victim, False)
    return out.to(q.dtype)


def _attend(attn, x: Tensor, budget: int, policy: str) -> Tensor:
    """One ``selattn_ext.nn.SelectiveSelfAttention(selective=False)`` layer under the policy."""
    bsz, n, _ = x.shape
    q, k, v = attn._project(x, torch.arange(n, device=x.device))
    g = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if policy == "streaming":
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=streaming_mask(n, budget,
                                                                             device=x.device))
    else:
        o = evicting_attention(q, k, v, budget, policy)
    return attn.out_proj(o.transpose(1, 2).reshape(bsz, n, -1))


@torch.no_grad()
def eviction_loss(model, batches: Iterable[Tuple[Tensor, Tensor]], budget: int,
                  policy: str) -> float:
    """Mean cross-entropy of a baseline ``examples/tiny_lm.TinyLM`` (plain attention) over
    ``(inputs, targets)`` batches with every layer's cache under ``policy`` at ``budget``.
    Layers run one after another over the whole sequence (teacher forcing): the same result
    as token-by-token decoding, since a layer's cache depends only on its own inputs."""
    model.eval()
    losses = []
    for inputs, targets in batches:
        x = model.embed(inputs)
        for blk in model.blocks:
            x = x + _attend(blk.attn, blk.norm1(x), budget, policy)
            x = x + blk.mlp(blk.norm2(x))
        logits = model.head(model.norm(x))
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      targets.reshape(-1)).item())
    return statistics.mean(losses)
