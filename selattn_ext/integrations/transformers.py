"""Hugging Face ``transformers`` integration: ``attn_implementation="selective"``.

    from selattn_ext.integrations.transformers import SelectivePrunedCache, register
    register()
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="selective")
    model.generate(ids, cache=SelectivePrunedCache(budget=256), max_new_tokens=64)
    # (older transformers 5.x name the argument past_key_values=)

``register()`` adds the attention function to ``transformers.AttentionInterface`` and a mask
function to ``AttentionMaskInterface`` under the name ``"selective"``. Any model that dispatches
through ``AttentionInterface`` with the ``(module, query, key, value, attention_mask, dropout,
scaling)`` contract works (Llama, Mistral without sliding window, Qwen2/3, ...); the query head
0 selects (DESIGN §1).

Prefill and training run the fused ``selattn_ext.attention``. Generation needs a
:class:`SelectivePrunedCache`: selective attention's F depends on the selection queries of all
earlier tokens, which a plain ``DynamicCache`` does not keep, so decoding with it would be wrong
and is rejected with an error. Without pruning (``budget`` >= the total length), decoding
through ``SelectivePrunedCache`` reproduces the no-cache forward exactly (up to rounding).

Ragged batches (DESIGN §1.1): every sequence keeps its own BOS, its own F and its own keys.
- Packed training (``DataCollatorWithFlattening``): when transformers passes ``cu_seq_lens_q``
  (``return_flash_attn_kwargs=True``) or ``position_ids`` that restart at 0, the packed
  documents run through ``selattn_ext.attention_varlen``, exactly as if run one by one.
- Padding: a 2-D ``attention_mask`` makes pad tokens invisible (they neither select, nor are
  selected, nor are attended to; their outputs are zeros). Left-padded batched generation works
  with :class:`SelectivePrunedCache` (pads never occupy a cache slot; a row's BOS is its first
  real token) and with ``use_cache=False``; each row generates what its prompt alone would.
  Right-padded prompts for generation raise (the last prompt token of a row would be a pad).
- Beam search reorders the pruned cache's rows (``reorder_cache``).
Other masks (sliding windows, chunked or bidirectional blocks, a custom 4-D mask that is not
plain causal) raise ``ValueError`` instead of being silently ignored.

Not supported (each raises): assisted generation (the pruned cache cannot be cropped), cache
offloading, output_attentions, attention dropout, softcapping / sinks / sliding windows.
The packed and padded no-cache paths run ``attention_varlen`` (CPU and CUDA kernels).

Transformers is an optional dependency: importing this module imports it, ``import
selattn_ext`` does not.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
except ImportError as exc:
    raise ImportError(
        "selattn_ext.integrations.transformers needs Hugging Face transformers >= 5 "
        "(pip install 'transformers>=5'); the rest of selattn_ext works without it"
    ) from exc

import selattn_ext

__all__ = ["ATTN_IMPLEMENTATION", "SelectivePrunedCache", "SelectivePrunedLayer", "register",
           "selective_attention_forward", "selective_mask"]

ATTN_IMPLEMENTATION = "selective"
SEL_HEAD = 0
MAX_DEFAULT_PREFILL_CHUNK = 128

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    raise ImportError(f"selattn_ext.integrations.transformers needs transformers >= 5, found "
                      f"{transformers.__version__}")


def register() -> None:
    """Make ``attn_implementation="selective"`` available to transformers models (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, selective_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, selective_mask)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------

def selective_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                   kv_offset: int = 0, mask_function=causal_mask_function,
                   attention_mask: Optional[Tensor] = None, **kwargs) -> Optional[Tensor]:
    """Mask builder for ``"selective"``: returns what the attention function needs, no N x N.

    The kernels apply causality and the BOS rule themselves. Returns None for plain causal
    attention, the (B, kv_length) bool keep-mask when ``attention_mask`` pads some token, or,
    for packed sequences (transformers' mask for restarting ``position_ids``), the int32
    ``cu_seqlens`` of the flattened (B * N) tokens. Anything else (sliding windows, chunked
    or bidirectional blocks, other overlays) raises: ignoring it would be silently wrong.
    """
    if kv_offset != 0:
        raise ValueError(
            "attn_implementation='selective' supports only causal attention from position 0; "
            f"this model asked for a mask starting at kv_offset={kv_offset} (sliding window?)")
    cu_seqlens = None
    if mask_function is not causal_mask_function:
        cu_seqlens = _packed_causal_segments(mask_function, batch_size, q_length, kv_length,
                                             attention_mask, kwargs.get("device"))
    if attention_mask is not None:
        keep = attention_mask[:, -kv_length:].to(torch.bool)
        if not bool(keep.all()):
            return keep
    return cu_seqlens


def _packed_causal_segments(mask_function, batch_size: int, q_length: int, kv_length: int,
                            attention_mask: Optional[Tensor], device=None) -> Optional[Tensor]:
    """For a mask function that is causal within independent packed segments, the int32
    cu_seqlens of the flattened tokens (None when each row is one segment); raises otherwise.

    O(N) probes instead of the N x N mask: segment starts are the queries that may not see their
    predecessor; then every query must see itself, its segment's first token and nothing
    before it, and no future token.
    """
    def fail():
        raise ValueError(
            "attn_implementation='selective' supports causal attention, packed sequences "
            "(restarting position_ids) and padding masks only; this model asked for a different "
            "mask pattern (sliding window, chunked or bidirectional blocks, or another overlay)")

    if q_length != kv_length:
        fail()
    n = q_length
    if n == 0 or batch_size == 0:
        return None
    b = torch.arange(batch_size, device=device)[:, None]
    i = torch.arange(n, device=device)[None, :].expand(batch_size, n)

    def allowed(q_idx, kv_idx):
        return torch.broadcast_to(torch.as_tensor(mask_function(b, 0, q_idx, kv_idx)),
                                  q_idx.shape)

    starts = ~allowed(i, (i - 1).clamp(min=0))
    starts[:, 0] = True
    first = torch.where(starts, i, torch.zeros_like(i)).cummax(dim=1).values
    ok = (bool(allowed(i, i).all()) and bool(allowed(i, first).all())
          and not bool((allowed(i, (i + 1).clamp(max=n - 1)) & (i < n - 1)).any())
          and not bool((allowed(i, (first - 1).clamp(min=0)) & (first > 0)).any()))
    if not ok:
        fail()
    if not bool(starts[:, 1:].any()):
        return None
    if attention_mask is not None:
        raise ValueError("attn_implementation='selective' cannot combine packed sequences with "
                         "a padding attention_mask")
    return _cu_seqlens_from_starts(starts)


def _cu_seqlens_from_starts(starts: Tensor) -> Tensor:
    """int32 cu_seqlens of the flattened (B * N) tokens from a (B, N) bool of segment starts
    (every row must start one)."""
    flat = starts.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    total = torch.tensor([flat.numel()], device=flat.device, dtype=idx.dtype)
    return torch.cat([idx, total]).to(torch.int32)


def _is_plain_causal(mask: Tensor, q_len: int, kv_len: int) -> bool:
    """Whether a 4-D (bool or additive float) mask is the causal mask of the last q_len rows."""
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2
        if bool((mask[allowed] != 0).any()):
            return False  # an additive bias on allowed entries: not plain causal
    rows = torch.arange(q_len, device=mask.device)[:, None] + (kv_len - q_len)
    expected = torch.arange(kv_len, device=mask.device)[None, :] <= rows
    return bool((allowed == expected).all())


# --------------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------------

# Bridge from Cache.update to the attention function: transformers calls
# ``cache.update(k, v, layer_idx)`` and then the attention function with the tensors update
# returned, but never passes the cache itself. A pruned cache cannot return "all keys", so
# update() returns the new k/v unchanged and records here, keyed by the identity of the returned
# key tensor, which layer must attend them; the attention function looks its key up. The layer
# holds that tensor until it is consumed, so the id cannot be reused while the entry exists.
_PENDING: Dict[int, "weakref.ReferenceType[SelectivePrunedLayer]"] = {}


def _take_pending(key: Tensor) -> Optional["SelectivePrunedLayer"]:
    ref = _PENDING.pop(id(key), None)
    layer = ref() if ref is not None else None
    if layer is None or layer._pending is None or layer._pending[0] is not key:
        return None
    return layer


_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux", "position_bias", "sinks")


def selective_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor,
                                value: Tensor, attention_mask: Optional[Tensor],
                                dropout: float = 0.0, scaling: Optional[float] = None,
                                is_causal: Optional[bool] = None, **kwargs
                                ) -> Tuple[Tensor, None]:
    """``AttentionInterface`` function: query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D).

    Returns ``(out (B, Nq, Hq, D), None)`` (no attention weights: they are never
    materialised). With a :class:`SelectivePrunedCache` it runs the pruned decode through the
    layer's cache (pads skipped). Without a cache (or on the first step with a fresh
    ``DynamicCache``, Nq == Nk): packed sequences (``cu_seq_lens_q`` or restarting
    ``position_ids``) and padded batches run ``selattn_ext.attention_varlen`` on the real
    tokens; a plain batch runs the dense ``selattn_ext.attention``.
    """
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='selective' does not support `{name}`")
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='selective' cannot return attention weights "
                         "(output_attentions=True); use attn_implementation='eager' for that")
    if dropout:
        raise ValueError(f"attn_implementation='selective' does not support attention dropout "
                         f"(got dropout={dropout}); set config.attention_dropout = 0")
    if is_causal is False or not getattr(module, "is_causal", True):
        raise ValueError("attn_implementation='selective' is always causal; this module asked "
                         "for non-causal (bidirectional) attention")
    q_len, kv_len = query.shape[2], key.shape[2]
    keep, cu_seqlens = None, None
    if attention_mask is not None:
        if attention_mask.dim() == 4:
            if not _is_plain_causal(attention_mask, q_len, kv_len):
                raise ValueError("attn_implementation='selective' supports only plain causal 4-D "
                                 "masks; got an attention_mask with padding or another pattern "
                                 "(pass the 2-D padding mask instead)")
        elif attention_mask.dim() == 2 and attention_mask.dtype == torch.bool:
            keep = attention_mask[:, -q_len:]  # selective_mask's keep-mask (B, kv_length)
        elif attention_mask.dim() == 1 and attention_mask.dtype == torch.int32:
            cu_seqlens = attention_mask  # selective_mask's packed segments
        else:
            raise ValueError(f"attn_implementation='selective' got an attention_mask of shape "
                             f"{tuple(attention_mask.shape)} and dtype {attention_mask.dtype}; "
                             "build masks through register()'s 'selective' mask function")

    layer = _take_pending(key)
    if layer is not None:
        out = layer.attend(query, key, value, scaling, keep)
        return out.transpose(1, 2).contiguous(), None
    if q_len != kv_len:
        raise ValueError(
            f"attn_implementation='selective' got {q_len} queries against {kv_len} cached keys: "
            "selective attention cannot continue from a plain KV cache (the accumulated "
            "selection F needs the earlier queries). Generate with "
            "cache=SelectivePrunedCache(budget=...) (past_key_values= in older transformers; "
            "exact when budget >= the total length) or with use_cache=False")
    if kwargs.get("cu_seq_lens_q") is not None:
        cu_seqlens = _cu_seqlens_from_kwargs(kwargs, query)
    elif cu_seqlens is None and keep is None and kwargs.get("position_ids") is not None:
        cu_seqlens = _cu_seqlens_from_position_ids(kwargs["position_ids"], query.shape[0],
                                                   q_len)
    if cu_seqlens is not None:
        if keep is not None:
            raise ValueError("attn_implementation='selective' cannot combine packed sequences "
                             "with a padding attention_mask")
        return _packed_attention(query, key, value, cu_seqlens, scaling), None
    if keep is not None and not bool(keep.all()):
        return _padded_attention(query, key, value, keep, scaling), None
    out = selattn_ext.attention(query, key, value, scale=scaling, sel_head=SEL_HEAD)
    return out.transpose(1, 2).contiguous(), None


def _flat_tokens(t: Tensor) -> Tensor:
    """(B, H, N, D) -> (B * N, H, D), a view when t is a transposed (B, N, H, D) projection."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b * n, h, d)


def _packed_attention(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor,
                      scaling: Optional[float]) -> Tensor:
    """Packed segments of the flattened rows, each an independent sequence; (B, N, Hq, D)."""
    b, hq, n, d = query.shape
    out = selattn_ext.attention_varlen(_flat_tokens(query), _flat_tokens(key),
                                       _flat_tokens(value), cu_seqlens, n, scale=scaling,
                                       sel_head=SEL_HEAD)
    return out.reshape(b, n, hq, d)


def _padded_attention(query: Tensor, key: Tensor, value: Tensor, keep: Tensor,
                      scaling: Optional[float]) -> Tensor:
    """A padded batch: the real tokens of each row, gathered into one packed batch, run
    through attention_varlen; pads are invisible and their outputs are zeros. (B, N, Hq, D)."""
    b, hq, n, d = query.shape
    prev = torch.cat([keep.new_zeros(b, 1), keep[:, :-1]], dim=1)
    if bool(((keep & ~prev).sum(dim=1) > 1).any()):
        raise ValueError(
            "attn_implementation='selective': attention_mask has a padding token between the "
            "real tokens of a row. Batched generation needs left padding (tokenizer "
            "padding_side='left'); a right-padded prompt would continue from a pad token")
    idx = keep.reshape(-1).nonzero().squeeze(1)
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=torch.int32)])
    packed = [_flat_tokens(t).index_select(0, idx) for t in (query, key, value)]
    out = selattn_ext.attention_varlen(*packed, cu_seqlens, n, scale=scaling, sel_head=SEL_HEAD)
    full = out.new_zeros(b * n, hq, d).index_copy(0, idx, out)
    return full.view(b, n, hq, d)


def _cu_seqlens_from_kwargs(kwargs, query: Tensor) -> Tensor:
    """The FlashAttention-style boundaries DataCollatorWithFlattening(return_flash_attn_kwargs=
    True) passes; queries and keys are the same packed tokens."""
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k")
    if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k.to(cu_q.device), cu_q):
        raise ValueError("attn_implementation='selective' needs cu_seq_lens_k == cu_seq_lens_q "
                         "(self-attention over the same packed tokens)")
    b, _, n, _ = query.shape
    cu = cu_q.to(device=query.device, dtype=torch.int32)
    if b != 1 and int(cu[-1]) != b * n:
        raise ValueError(f"attn_implementation='selective': cu_seq_lens_q ends at {int(cu[-1])}, "
                         f"but the batch holds {b} x {n} tokens")
    return cu


def _cu_seqlens_from_position_ids(position_ids: Tensor, batch: int, n: int) -> Optional[Tensor]:
    """Packed segments where position_ids stop counting up by 1 (transformers' rule), or None
    when every row is one run. Each segment must restart at position 0: its first token is its
    BOS."""
    pos = position_ids.expand(batch, -1)
    if pos.shape[1] != n:
        return None
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    if not bool(starts[:, 1:].any()):
        return None
    if bool((pos[starts] != 0).any()):
        raise ValueError("attn_implementation='selective': packed position_ids must restart at 0 "
                         "for every sequence (its first token is its BOS); got a sequence "
                         "starting at another position")
    return _cu_seqlens_from_starts(starts)


# --------------------------------------------------------------------------------------------
# Pruned cache
# --------------------------------------------------------------------------------------------

class SelectivePrunedLayer(CacheLayerMixin):
    """One layer of :class:`SelectivePrunedCache`: wraps a ``selattn_ext.SelectiveKVCache``.

    ``update`` only stages the new keys/values; the attention function then calls
    :meth:`attend`, which feeds them to ``selattn_ext.decode`` in chunks of ``prefill_chunk``
    tokens (the cache is allocated lazily, on the first update, from the shapes, dtype and device
    it sees). ``keys``/``values`` stay None: the kept entries live in ``kv_cache``.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, budget: int, tau: Optional[float] = None,
                 prefill_chunk: Optional[int] = None):
        super().__init__()
        self.budget, self.tau = budget, tau
        self.prefill_chunk = prefill_chunk or min(budget, MAX_DEFAULT_PREFILL_CHUNK)
        self.kv_cache = None
        self.seen = 0  # columns added so far, pads included (the next token's column)
        self._attended = 0  # columns that went through attend()
        self._pending: Optional[Tuple[Tensor, Tensor]] = None

    def __repr__(self):
        return f"{type(self).__name__}(budget={self.budget}, tau={self.tau}, seen={self.seen})"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, hkv, _, d = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.kv_cache = selattn_ext.SelectiveKVCache(
            b, hkv, d, self.budget, max_chunk=self.prefill_chunk, tau=self.tau,
            dtype=key_states.dtype, device=key_states.device)
        self.is_initialized = True

    def check_consumed(self) -> None:
        """Raises if keys/values staged by update() were never attended through this layer."""
        if self._pending is not None:
            _PENDING.pop(id(self._pending[0]), None)
            self._pending = None
            raise RuntimeError(
                "SelectivePrunedCache: the keys/values staged by update() were never attended. "
                "SelectivePrunedCache only works with attn_implementation='selective' (call "
                "selattn_ext.integrations.transformers.register() and set it on the model)")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs
               ) -> Tuple[Tensor, Tensor]:
        self.check_consumed()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.kv_cache_batch():
            raise ValueError(f"SelectivePrunedCache: batch size changed from "
                             f"{self.kv_cache_batch()} to {key_states.shape[0]}")
        self._pending = (key_states, value_states)
        _PENDING[id(key_states)] = weakref.ref(self)
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def kv_cache_batch(self) -> int:
        return self.kv_cache.batch_size

    def attend(self, query: Tensor, key: Tensor, value: Tensor, scaling: Optional[float],
               keep: Optional[Tensor] = None) -> Tensor:
        """Runs the staged chunk through the pruned cache; returns out (B, Hq, Nq, D).

        ``keep`` (B, Nq) bool marks real tokens; pads are skipped (they never take a slot, and
        a row's first real token is its BOS) and their outputs are zeros. Each row's real
        tokens are moved to the front of the chunk and passed with per-row ``lengths``: no
        host synchronisation.
        """
        self._pending = None
        first_forward = self._attended == 0
        self._attended += query.shape[2]
        if keep is not None and first_forward:
            _check_left_padded(keep)
        order = None
        if keep is not None:
            # Real tokens first, in order (a stable sort of the pad flags).
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            valid = keep.sum(dim=1)
            query, key, value = (_take_rows(t, order) for t in (query, key, value))
        step = self.prefill_chunk
        outs = []
        for i in range(0, query.shape[2], step):
            lengths = None if order is None else (valid - i).clamp(0, step)
            outs.append(selattn_ext.decode(query[:, :, i:i + step], key[:, :, i:i + step],
                                           value[:, :, i:i + step], self.kv_cache,
                                           scale=scaling, sel_head=SEL_HEAD, lengths=lengths))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        if order is not None:  # back to the original columns (pads' rows are zeros)
            index = order[:, None, :, None].expand_as(out)
            out = torch.empty_like(out).scatter_(2, index, out)
        return out

    def positions(self) -> List[List[int]]:
        return self.kv_cache.positions() if self.kv_cache is not None else []

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.kv_cache is not None:
            self.kv_cache.reset()
        self.seen = self._attended = 0
        if self._pending is not None:
            _PENDING.pop(id(self._pending[0]), None)
            self._pending = None

    def offload(self):
        raise NotImplementedError("SelectivePrunedCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("SelectivePrunedCache does not support offloading")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row r becomes the old row ``beam_idx[r]`` (kept tokens, F, lengths)."""
        if self.kv_cache is not None:
            self.kv_cache.select_rows_(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SelectivePrunedCache cannot be cropped (evicted tokens are "
                                  "gone); assisted/speculative generation is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv_cache is not None:
            rows = torch.arange(self.kv_cache.batch_size, device=self.kv_cache.device)
            self.kv_cache.select_rows_(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.kv_cache is not None:
            self.kv_cache.select_rows_(indices)


def _take_rows(t: Tensor, order: Tensor) -> Tensor:
    """t (B, H, N, D) with its N columns permuted per row by order (B, N)."""
    return t.gather(2, order[:, None, :, None].expand_as(t))


def _check_left_padded(keep: Tensor) -> None:
    """A prompt's pads must all come before its real tokens, and every row needs one real
    token (read once, on the first forward)."""
    if not bool(keep[:, -1].all()):
        raise ValueError(
            "SelectivePrunedCache: a prompt ends with a padding token (right padding). "
            "Batched generation needs left padding (tokenizer padding_side='left'): the next "
            "token would otherwise be predicted from a pad")
    prev = torch.cat([keep.new_zeros(keep.shape[0], 1), keep[:, :-1]], dim=1)
    if bool(((keep & ~prev).sum(dim=1) > 1).any()):
        raise ValueError("SelectivePrunedCache: attention_mask has a padding token between the "
                         "real tokens of a prompt; use left padding")


class SelectivePrunedCache(Cache):
    """A transformers ``Cache`` that keeps at most ``budget`` tokens per layer and sequence.

    Pass it to ``model.generate(..., past_key_values=SelectivePrunedCache(budget=...))`` with a
    model using ``attn_implementation="selective"``. Each layer prunes by the accumulated
    selection F (DESIGN §3): once more than ``budget`` tokens are held, the most-selected
    (most "masked") token is evicted; BOS (position 0) never is.

    Args:
        budget: tokens kept per sequence, an int for every layer or a list with one per layer.
        tau: optional threshold: also evict every token whose F exceeds ``tau`` (per layer list
            accepted too).
        prefill_chunk: tokens per ``selattn_ext.decode`` call when a forward brings several
            (the prompt); default ``min(budget, 128)`` per layer. Evictions happen between
            chunks, so ``prefill_chunk=1`` reproduces token-by-token decoding exactly even when
            the prompt exceeds the budget; larger chunks are faster, and give the same result
            whenever nothing is evicted (budget >= length, no tau). Each layer's cache holds
            ``budget + prefill_chunk`` slots per sequence.

    ``get_seq_length()`` is the number of tokens seen (absolute positions), not the number kept.
    """

    def __init__(self, budget: Union[int, Sequence[int]], tau: Union[None, float,
                 Sequence[Optional[float]]] = None, *,
                 prefill_chunk: Optional[int] = None):
        budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget]
        if not budgets or any(not isinstance(b, int) or isinstance(b, bool) or b < 1
                              for b in budgets):
            raise ValueError(f"SelectivePrunedCache: budget must be a positive int or a non-empty "
                             f"list of positive ints, got {budget!r}")
        taus = list(tau) if isinstance(tau, (list, tuple)) else None
        if taus is not None and not taus:
            raise ValueError("SelectivePrunedCache: tau must be None, a number or a non-empty "
                             "list")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int)
                                          or isinstance(prefill_chunk, bool) or prefill_chunk < 1):
            raise ValueError(f"SelectivePrunedCache: prefill_chunk must be a positive int, got "
                             f"{prefill_chunk!r}")
        super().__init__(layers=[])
        self._budget_list = budgets if isinstance(budget, (list, tuple)) else None
        self._budget = budgets[0]
        self._tau_list, self._tau = taus, (None if taus is not None else tau)
        self.prefill_chunk = prefill_chunk

    def _new_layer(self, layer_idx: int) -> SelectivePrunedLayer:
        for name, per_layer in (("budget", self._budget_list), ("tau", self._tau_list)):
            if per_layer is not None and layer_idx >= len(per_layer):
                raise ValueError(f"SelectivePrunedCache: the per-layer {name} list has "
                                 f"{len(per_layer)} entries, but the model has a layer "
                                 f"{layer_idx}")
        budget = self._budget_list[layer_idx] if self._budget_list else self._budget
        tau = self._tau_list[layer_idx] if self._tau_list else self._tau
        return SelectivePrunedLayer(budget, tau, self.prefill_chunk)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args,
               **kwargs) -> Tuple[Tensor, Tensor]:
        """Stages the new keys/values of ``layer_idx``; returns them unchanged (see module doc)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        for layer in self.layers:  # catches a non-selective attention at the next layer
            layer.check_consumed()
        return self.layers[layer_idx].update(key_states, value_states)

    def positions(self) -> List[List[List[int]]]:
        """Kept token positions: a list over layers of a list over the batch of sorted ints."""
        return [layer.positions() for layer in self.layers]

    def memory_bytes(self) -> int:
        """Bytes held by all layers' pruned caches: every layer's state, plus the largest
        per-step workspace (layers step one at a time, each step's scratch is freed after it)."""
        caches = [layer.kv_cache for layer in self.layers if layer.kv_cache is not None]
        return (sum(c.state_bytes() for c in caches)
                + max((c.workspace_bytes() for c in caches), default=0))
