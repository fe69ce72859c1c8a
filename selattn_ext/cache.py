"""Pruned KV cache for selective attention at inference (DESIGN §3).

    cache = SelectiveKVCache(batch_size, num_kv_heads, head_dim, budget, max_chunk=1)
    out = decode(q, k, v, cache)      # q (B, Hq, c, D), k/v (B, Hkv, c, D), c <= max_chunk

One cache per layer. Each :func:`decode` call appends ``c`` tokens per sequence, attends with
the accumulated selection F subtracted from the logits, updates F and evicts down to ``budget``
tokens (the largest F first; BOS is never evicted). Storage is ``budget + max_chunk`` slots per
sequence, whatever the sequence length.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops

__all__ = ["SelectiveKVCache", "decode"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class SelectiveKVCache:
    """Per-layer pruned KV cache: fixed ``budget + max_chunk`` slots per sequence.

    Args:
        batch_size, num_kv_heads, head_dim: shape of the cached keys/values (B, Hkv, ., D).
        budget: tokens kept per sequence after each step (>= 1; BOS counts).
        max_chunk: most new tokens per :func:`decode` call (1 for token-by-token decoding;
            larger for chunked prefill).
        tau: optional threshold; tokens whose F exceeds it are evicted before the budget rule.
        dtype, device: of the cached keys/values (q, k, v passed to :func:`decode` must match).
        num_q_heads: query heads of the model (CUDA): the step workspace is then allocated here,
            once; without it, at the first :func:`decode` (sized for that call's query heads).
            Either way every later step reuses it: a step allocates nothing, synchronises
            nothing, and can be captured in a CUDA graph.

    Tensors (all mutated in place by :func:`decode`; slot order is irrelevant):
        k_cache, v_cache (B, Hkv, slots, D) in ``dtype``; f (B, slots) float32 (float64 for a
        float64 cache); pos (B, slots) int64, -1 for a free slot; seq_len (B,) int64.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, budget: int, *,
                 max_chunk: int = 1, tau: Optional[float] = None,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                 num_q_heads: Optional[int] = None):
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.budget = _positive_int("budget", budget)
        self.max_chunk = _positive_int("max_chunk", max_chunk)
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if tau is not None:
            tau = float(tau)
            if tau != tau:
                raise ValueError("tau must be a number or None, got NaN")
        self.tau = tau
        self.dtype = dtype
        slots = self.budget + self.max_chunk
        self.slots = slots
        shape = (batch_size, num_kv_heads, slots, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.device = self.k_cache.device
        f_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.f = torch.zeros(batch_size, slots, dtype=f_dtype, device=self.device)
        self.pos = torch.full((batch_size, slots), -1, dtype=torch.int64, device=self.device)
        self.seq_len = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        # CUDA step scratch (split-KV partial states, running F sums), owned here and reused by
        # every step; keyed by the (query heads, batch size) it was sized for.
        self.workspace: Optional[Tensor] = None
        self._workspace_key: Optional[tuple] = None
        if num_q_heads is not None:
            num_q_heads = _positive_int("num_q_heads", num_q_heads)
            if num_q_heads % self.num_kv_heads != 0:
                raise ValueError(f"num_q_heads = {num_q_heads} must be a multiple of "
                                 f"num_kv_heads = {self.num_kv_heads}")
            self.step_workspace(num_q_heads)

    def positions(self) -> List[List[int]]:
        """Kept token positions per sequence, ascending."""
        return [sorted(p for p in row if p >= 0) for row in self.pos.tolist()]

    @property
    def seq_lengths(self) -> List[int]:
        """Tokens seen so far per sequence (kept or evicted)."""
        return self.seq_len.tolist()

    def state_bytes(self) -> int:
        """Bytes of the cache state tensors: k_cache, v_cache, f, pos, seq_len."""
        return sum(t.numel() * t.element_size()
                   for t in (self.k_cache, self.v_cache, self.f, self.pos, self.seq_len))

    def workspace_bytes(self) -> int:
        """Scratch of one :func:`decode` step of up to ``max_chunk`` tokens.

        CPU: the peak the kernel allocates, by its own sizing (per-sequence F offsets of the
        chunk against every slot, plus per-thread tiles at the current
        ``torch.get_num_threads()``); it does not depend on the number of query heads or on the
        sequence length. CUDA: the bytes of :attr:`workspace`, the buffer this cache holds and
        every step reuses (split-KV partial states per query head and split, running F sums);
        0 until it exists (see ``num_q_heads``).
        """
        if self.device.type != "cpu":
            return 0 if self.workspace is None else self.workspace.numel()
        return int(torch.ops.selattn.decode_cpu_workspace_bytes(
            self.batch_size, self.num_kv_heads, self.max_chunk, self.head_dim, self.slots,
            self.dtype))

    def step_workspace(self, num_q_heads: int) -> Optional[Tensor]:
        """The CUDA step workspace for ``num_q_heads`` query heads (None on the CPU): allocated
        on first use or when the query heads or the batch size change, reused otherwise."""
        if self.device.type != "cuda":
            return None
        key = (num_q_heads, self.batch_size)
        if self.workspace is None or self._workspace_key != key:
            nbytes = int(torch.ops.selattn.decode_cuda_workspace_bytes(
                self.batch_size, num_q_heads, self.num_kv_heads, self.max_chunk, self.head_dim,
                self.slots, self.dtype, self.device))
            self.workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
            self._workspace_key = key
        return self.workspace

    def memory_bytes(self) -> int:
        """Every byte the cache and its step workspace hold: :meth:`state_bytes` plus
        :meth:`workspace_bytes`. O(budget + max_chunk), never O(sequence length); fixed at
        construction (on CUDA once the workspace exists: pass ``num_q_heads``)."""
        return self.state_bytes() + self.workspace_bytes()

    def select_rows_(self, rows: Union[Tensor, Sequence[int]]) -> None:
        """Replaces the sequences by ``rows`` of the current ones, in place: sequence r becomes
        the old sequence ``rows[r]`` (beam-search reordering, batch selection or expansion; the
        batch size becomes ``len(rows)``). Keys, values, F, positions and lengths move
        together; no host synchronisation."""
        rows = torch.as_tensor(rows, dtype=torch.int64).to(self.device)
        if rows.dim() != 1 or rows.numel() < 1:
            raise ValueError(f"rows must be a non-empty 1-D index, got shape {tuple(rows.shape)}")
        for name in ("k_cache", "v_cache", "f", "pos", "seq_len"):
            setattr(self, name, getattr(self, name).index_select(0, rows))
        self.batch_size = rows.numel()

    def reset(self) -> None:
        """Empties every sequence (keeps the storage)."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.f.zero_()
        self.pos.fill_(-1)
        self.seq_len.zero_()

    def __repr__(self) -> str:
        return (f"SelectiveKVCache(batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, budget={self.budget}, max_chunk={self.max_chunk}, "
                f"tau={self.tau}, dtype={self.dtype}, device={self.device})")


def _lengths_tensor(lengths, batch: int, chunk: int, device: torch.device) -> Optional[Tensor]:
    if lengths is None:
        return None
    if isinstance(lengths, Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
        t = lengths.to(device=device, dtype=torch.int64)
    else:
        values = list(lengths)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
            raise TypeError("lengths must be a sequence of ints or an integer tensor")
        t = torch.tensor(values, dtype=torch.int64, device=device)
    if t.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},) (one per sequence), "
                         f"got {tuple(t.shape)}")
    if t.device.type == "cpu" and batch > 0 and not bool(((t >= 0) & (t <= chunk)).all()):
        raise ValueError(f"lengths must be in [0, {chunk}] (the chunk size), got {t.tolist()}")
    return t.contiguous()


def decode(q: Tensor, k: Tensor, v: Tensor, cache: SelectiveKVCache, *,
           scale: Optional[float] = None, sel_head: int = 0,
           lengths: Optional[Union[Tensor, Sequence[int]]] = None) -> Tensor:
    """One step of the pruned KV cache: attend ``c`` new tokens per sequence, then prune.

    Args:
        q: (B, Hq, c, D) queries of the new tokens (``1 <= c <= cache.max_chunk``); any strides
            with a contiguous last dim.
        k, v: (B, Hkv, c, D) keys/values of the new tokens (RoPE already applied).
        cache: the layer's :class:`SelectiveKVCache` (updated in place).
        scale: logit scale for attention and selection; default ``D ** -0.5``.
        sel_head: query head whose logits select (negative counts from the end).
        lengths: optional (B,) valid new tokens per sequence (ragged batches): only the first
            ``lengths[b]`` tokens of sequence b are added; its other output rows are zero.

    New token i (at position ``seq_len + i``) attends to every kept token j up to its own
    position with logit ``s q.k_j - F_j`` (F including the earlier tokens of this chunk).
    Then F is updated and the cache evicts (tau first, then the largest F while over budget).

    Returns:
        ``out`` (B, Hq, c, D) in the dtype of q.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, c, D), got {t.dim()}-D")
    if not isinstance(cache, SelectiveKVCache):
        raise TypeError(f"cache must be a SelectiveKVCache, got {type(cache).__name__}")
    bsz, hq, c, d = q.shape
    if c < 1 or c > cache.max_chunk:
        raise ValueError(f"the chunk (q.size(2) = {c}) must be in [1, max_chunk = "
                         f"{cache.max_chunk}]; build the cache with a larger max_chunk")
    if bsz != cache.batch_size:
        raise ValueError(f"q.size(0) = {bsz} must equal the cache's batch_size = {cache.batch_size}")
    if d != cache.head_dim:
        raise ValueError(f"q.size(-1) = {d} must equal the cache's head_dim = {cache.head_dim}")
    for name, t in (("k", k), ("v", v)):
        expected = (bsz, cache.num_kv_heads, c, d)
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape (B, num_kv_heads, c, D) = {expected}, "
                             f"got {tuple(t.shape)}")
    if hq % cache.num_kv_heads != 0:
        raise ValueError(f"the number of query heads (q.size(1) = {hq}) must be a multiple of "
                         f"the cache's num_kv_heads = {cache.num_kv_heads}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != cache.dtype:
            raise TypeError(f"{name} must have the cache's dtype {cache.dtype}, got {t.dtype}")
        if t.device != cache.device:
            raise ValueError(f"{name} must be on the cache's device {cache.device}, got {t.device}")
    if isinstance(sel_head, bool) or not isinstance(sel_head, int):
        raise TypeError(f"sel_head must be an int, got {type(sel_head).__name__}")
    if not -hq <= sel_head < hq:
        raise ValueError(f"sel_head must be in [-{hq}, {hq}) for {hq} query heads, got {sel_head}")
    if scale is None:
        scale = d ** -0.5
    lengths_t = _lengths_tensor(lengths, bsz, c, cache.device)
    return ops.decode_step(q, k, v, cache.k_cache, cache.v_cache, cache.f, cache.pos,
                           cache.seq_len, lengths_t, float(scale), sel_head % hq, cache.budget,
                           cache.tau, cache.step_workspace(hq))
