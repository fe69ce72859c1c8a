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

Masks: selective attention is always causal with position 0 as the BOS token. Only plain causal
masks are accepted; a padding mask with any masked token (left padding, or right padding
during generation), packed sequences, sliding windows, or a custom 4-D mask that is not plain
causal raise ``ValueError`` instead of being silently ignored. For right-padded training
batches pass ``attention_mask=None``: with causal attention the padding after a sequence never
affects that sequence's own tokens (ignore the padded positions' outputs, e.g. labels = -100).

Not supported (each raises): beam search with a pruned cache (it cannot be reordered),
assisted generation (it cannot be cropped), cache offloading, output_attentions, attention
dropout, softcapping / sinks / sliding windows. Sampling with num_return_sequences > 1 works
(the fresh cache is created at the expanded batch size).

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
                   attention_mask: Optional[Tensor] = None, **kwargs) -> None:
    """Mask builder for ``"selective"``: checks the mask is plain causal, returns None.

    The kernels apply causality (and the BOS rule) themselves, so no mask is materialised.
    Anything else (padding, packing, sliding windows, extra mask overlays) raises: the kernels
    cannot honour it, and ignoring it would give silently wrong outputs.
    """
    if mask_function is not causal_mask_function or kv_offset != 0:
        raise ValueError(
            "attn_implementation='selective' supports only plain causal attention; this model "
            "asked for a different mask pattern (packed sequences with restarting position_ids, "
            "sliding window, chunked or bidirectional blocks)")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "attn_implementation='selective' does not support padding: attention_mask has "
            "masked tokens. Selective attention always treats position 0 as BOS and is causal, "
            "so left padding cannot be expressed; generate one sequence at a time or batch "
            "sequences of equal length. For right-padded training batches pass "
            "attention_mask=None (padding after a sequence never affects its own outputs).")
    return None


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
    materialised). Without a cache, or on the first step with a fresh ``DynamicCache``
    (Nq == Nk), runs the fused prefill; with a :class:`SelectivePrunedCache` it runs the pruned
    decode through the layer's cache.
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
    if attention_mask is not None and not _is_plain_causal(attention_mask, q_len, kv_len):
        raise ValueError("attn_implementation='selective' supports only plain causal masks; got "
                         "an attention_mask with padding or another pattern")

    layer = _take_pending(key)
    if layer is not None:
        out = layer.attend(query, key, value, scaling)
    elif q_len != kv_len:
        raise ValueError(
            f"attn_implementation='selective' got {q_len} queries against {kv_len} cached keys: "
            "selective attention cannot continue from a plain KV cache (the accumulated "
            "selection F needs the earlier queries). Generate with "
            "cache=SelectivePrunedCache(budget=...) (past_key_values= in older transformers; "
            "exact when budget >= the total length) or with use_cache=False")
    else:
        out = selattn_ext.attention(query, key, value, scale=scaling, sel_head=SEL_HEAD)
    return out.transpose(1, 2).contiguous(), None


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
        self.seen = 0  # absolute tokens added so far (the next token's position)
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

    def attend(self, query: Tensor, key: Tensor, value: Tensor,
               scaling: Optional[float]) -> Tensor:
        """Runs the staged chunk through the pruned cache; returns out (B, Hq, Nq, D)."""
        self._pending = None
        step = self.prefill_chunk
        outs = [selattn_ext.decode(query[:, :, i:i + step], key[:, :, i:i + step],
                                   value[:, :, i:i + step], self.kv_cache, scale=scaling,
                                   sel_head=SEL_HEAD)
                for i in range(0, query.shape[2], step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

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
        self.seen = 0
        if self._pending is not None:
            _PENDING.pop(id(self._pending[0]), None)
            self._pending = None

    def offload(self):
        raise NotImplementedError("SelectivePrunedCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("SelectivePrunedCache does not support offloading")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SelectivePrunedCache does not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SelectivePrunedCache cannot be cropped (evicted tokens are "
                                  "gone); assisted/speculative generation is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.seen:
            raise NotImplementedError("SelectivePrunedCache cannot be expanded along the batch "
                                      "after use; pass a fresh cache to generate()")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("SelectivePrunedCache does not support batch selection")


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
