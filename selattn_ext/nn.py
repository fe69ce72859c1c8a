"""``selattn_ext.nn``: modules built on the fused ops.

``SelectiveSelfAttention`` trains through :func:`selattn_ext.attention` and, given a
:class:`selattn_ext.SelectiveKVCache`, decodes through :func:`selattn_ext.decode`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import _positions_in_sequence, attention, attention_varlen

__all__ = ["RotaryEmbedding", "SelectiveSelfAttention"]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021), "rotate half" convention (as in Llama).

    Channel pairs (c, c + D/2) of each head are rotated by angle ``pos * base**(-2c/D)``.
    Applied to q and k before attention and before caching, so cached keys never need
    re-rotation and the pruned cache's slot order does not matter.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (B, N, H, D); positions (N,) or (B, N) integer positions -> rotated x (B, N, H, D)."""
        angles = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # (..., N, D/2)
        if angles.dim() == 2:
            angles = angles[None]
        cos = angles.cos()[:, :, None, :].to(x.dtype)  # (B|1, N, 1, D/2)
        sin = angles.sin()[:, :, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class SelectiveSelfAttention(nn.Module):
    """Causal multi-head selective self-attention with a fused qkv projection, RoPE and GQA.

    Args:
        embed_dim: model width; must be divisible by ``num_heads``.
        num_heads: query heads (head_dim = embed_dim // num_heads).
        num_kv_heads: key/value heads (GQA/MQA); default ``num_heads``. Must divide num_heads.
        rope: apply rotary embeddings to q and k.
        rope_base: RoPE frequency base.
        bias: bias in the projections.
        sel_head: the query head whose logits select (negative counts from the end).
        selective: False gives plain causal attention with the same parameters (an ablation
            baseline; it cannot use a pruned cache).
        memory_tau: clip level tau of the paper's auxiliary memory loss (needs selective=True).
            When set, every forward without a cache stores this layer's memory M (B, N)
            (see :func:`selattn_ext.attention`) in ``self.last_memory``, with its autograd
            graph; a forward with a cache sets it to None. The training loop collects them::

                loss = lm_loss + eps * selattn_ext.memory_loss(
                    [m.last_memory for m in model.modules()
                     if isinstance(m, SelectiveSelfAttention)])

    ``forward(x, cache=None)``: x (B, N, embed_dim). Without a cache, runs the fused prefill
    (training). With a ``SelectiveKVCache`` it appends the N tokens to the cache (in chunks of
    ``cache.max_chunk``) at positions continuing each sequence, and attends through the
    pruned cache; ``lengths`` (B,) marks valid tokens per sequence for ragged batches.
    ``forward(x, cu_seqlens=..., max_seqlen=...)`` with x (1, total, embed_dim) trains on
    packed sequences through :func:`selattn_ext.attention_varlen` (positions restart at 0 for
    each sequence).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *,
                 rope: bool = True, rope_base: float = 10000.0, bias: bool = False,
                 sel_head: int = 0, selective: bool = True,
                 memory_tau: Optional[float] = None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if not -num_heads <= sel_head < num_heads:
            raise ValueError(f"sel_head must be in [-{num_heads}, {num_heads}), got {sel_head}")
        if memory_tau is not None:
            if not selective:
                raise ValueError("memory_tau needs selective=True (plain attention masks nothing)")
            if not (math.isfinite(memory_tau) and memory_tau > 0):
                raise ValueError(f"memory_tau must be a positive finite number, got {memory_tau}")
        self.memory_tau = memory_tau
        self.last_memory: Optional[Tensor] = None
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.sel_head = sel_head
        self.selective = selective
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    def _project(self, x: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        # (B, N, H, D) -> (B, H, N, D) views: the op takes any strides with a contiguous last dim.
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, cache=None, *, lengths: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, N, {self.embed_dim}), got {tuple(x.shape)}")
        if (getattr(self.qkv, "_selattn_tp", None) is not None
                or getattr(self, "_selattn_cp", None) is not None):
            # Set by selattn_ext.distributed (tp_plan / enable_context_parallel).
            from .distributed import module_forward
            return module_forward(self, x, cache, lengths=lengths, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen)
        b, n, _ = x.shape
        if cu_seqlens is not None:
            return self._forward_packed(x, cache, lengths, cu_seqlens, max_seqlen)
        if cache is None:
            if lengths is not None:
                raise ValueError("lengths is only meaningful with a cache")
            q, k, v = self._project(x, torch.arange(n, device=x.device))
            if self.memory_tau is not None:
                out, self.last_memory = attention(q, k, v, sel_head=self.sel_head,
                                                  memory_tau=self.memory_tau)
            elif self.selective:
                out = attention(q, k, v, sel_head=self.sel_head)
            else:
                out = F.scaled_dot_product_attention(
                    q, k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1),
                    v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1), is_causal=True)
        elif not self.selective:
            raise ValueError("a SelectiveKVCache needs selective=True")
        else:
            self.last_memory = None  # decoding has no training loss; drop a stale graph
            out = self._decode(x, cache, lengths)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))

    def _forward_packed(self, x: Tensor, cache, lengths, cu_seqlens: Tensor,
                        max_seqlen: Optional[int]) -> Tensor:
        """x (1, total, E) holding the packed sequences of ``cu_seqlens`` (DESIGN §1.1): each
        restarts at position 0 (RoPE and BOS) and attends only to itself."""
        if cache is not None or lengths is not None:
            raise ValueError("cu_seqlens (packed training) cannot be combined with a cache or "
                             "lengths")
        if x.shape[0] != 1:
            raise ValueError(f"packed x must be (1, total, E), got {tuple(x.shape)}")
        if not self.selective or self.memory_tau is not None:
            raise ValueError("cu_seqlens needs selective=True and no memory_tau")
        total = x.shape[1]
        if max_seqlen is None:  # an upper bound is enough; the op checks it
            max_seqlen = total
        positions = _positions_in_sequence(cu_seqlens, total)
        q, k, v = self._project(x, positions)  # (1, H, total, D) views
        out = attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                               cu_seqlens, max_seqlen, sel_head=self.sel_head)
        return self.out_proj(out.reshape(1, total, self.num_heads * self.head_dim))

    def _decode(self, x: Tensor, cache, lengths: Optional[Tensor]) -> Tensor:
        from .cache import decode

        b, n, _ = x.shape
        outs = []
        for start in range(0, n, cache.max_chunk):
            chunk = x[:, start:start + cache.max_chunk]
            c = chunk.shape[1]
            chunk_lengths = None
            if lengths is not None:
                chunk_lengths = (torch.as_tensor(lengths, device=x.device) - start).clamp(0, c)
            seen = torch.as_tensor(cache.seq_lengths, device=x.device).view(b, 1)
            positions = seen + torch.arange(c, device=x.device)
            q, k, v = self._project(chunk, positions)
            outs.append(decode(q, k, v, cache, sel_head=self.sel_head, lengths=chunk_lengths))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
