"""Python side of the ``torch.ops.selattn`` library: fake (meta) kernels and autograd.

The schemas and the CPU/CUDA kernels are registered in C++ (csrc/ops.cpp); importing
``selattn_ext._C`` loads them. This file adds what torch.compile and autograd need, and nothing
else: argument checking lives in C++ so there is one source of truth for it.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.selattn.*)

__all__ = ["prefill_fwd", "prefill_bwd"]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def prefill_fwd(q: Tensor, k: Tensor, v: Tensor, q_sel: Tensor, k_sel: Tensor, scale: float,
                mem_tau: Optional[float] = None) -> Tuple[Tensor, ...]:
    """Raw forward op: returns (out, lse), or (out, lse, mem) when ``mem_tau`` is given.
    Prefer :func:`selattn_ext.attention`.

    ``mem`` is ``R[b, i] = sum_{j <= i} min(F[b, i, j], mem_tau)`` (B, N) in lse's dtype (the
    row sums of the auxiliary memory loss). The op itself always returns three tensors (mem is
    an empty placeholder without mem_tau); this wrapper drops the placeholder so callers that
    predate mem_tau keep working.
    """
    out, lse, mem = torch.ops.selattn.prefill_fwd.default(q, k, v, q_sel, k_sel, scale, mem_tau)
    return (out, lse) if mem_tau is None else (out, lse, mem)


def prefill_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, q_sel: Tensor, k_sel: Tensor,
                out: Tensor, lse: Tensor, dlse: Optional[Tensor], scale: float,
                dmem: Optional[Tensor] = None, mem_tau: Optional[float] = None,
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Raw backward op: returns (dq, dk, dv, dq_sel, dk_sel). ``dmem`` (B, N), the gradient of
    the forward's ``mem``, needs that forward's ``mem_tau``."""
    return torch.ops.selattn.prefill_bwd.default(dout, q, k, v, q_sel, k_sel, out, lse, dlse,
                                                 scale, dmem, mem_tau)


def _check_same_device(q: Tensor, **others: Tensor) -> None:
    # The C++ kernels check everything; this is the one check a fake (meta) call also needs,
    # because mixing a meta tensor with a real one dispatches to the fake alone.
    for name, t in others.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"selattn: {name} must be on the device of q ({q.device}), got {t.device}")


@torch.library.register_fake("selattn::prefill_fwd")
def _prefill_fwd_fake(q, k, v, q_sel, k_sel, scale, mem_tau=None):
    _check_same_device(q, k=k, v=v, q_sel=q_sel, k_sel=k_sel)
    b, hq, n, _ = q.shape
    if mem_tau is not None and not (math.isfinite(mem_tau) and mem_tau > 0):
        raise ValueError(f"selattn: mem_tau (memory_tau) must be a positive finite number, "
                         f"got {mem_tau}")
    # Mirrors csrc/ops.cpp: out = empty_like(q), lse contiguous (B, Hq, N), mem (B, N) or (0,).
    stats = _stats_dtype(q.dtype)
    mem = q.new_empty((b, n) if mem_tau is not None else (0,), dtype=stats)
    return torch.empty_like(q), q.new_empty((b, hq, n), dtype=stats), mem


@torch.library.register_fake("selattn::prefill_bwd")
def _prefill_bwd_fake(dout, q, k, v, q_sel, k_sel, out, lse, dlse, scale, dmem=None,
                      mem_tau=None):
    _check_same_device(q, dout=dout, k=k, v=v, q_sel=q_sel, k_sel=k_sel, out=out, lse=lse,
                       dlse=dlse, dmem=dmem)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(q_sel), torch.empty_like(k_sel))


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.numel() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _prefill_setup_context(ctx, inputs, output):
    q, k, v, q_sel, k_sel, scale = inputs[:6]
    mem_tau = inputs[6] if len(inputs) > 6 else None
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, q_sel, k_sel, out, lse)
    ctx.scale, ctx.mem_tau = scale, mem_tau
    # Unused outputs' gradients arrive as None rather than as materialised zeros: the kernel
    # skips a None dlse, and a zeros tensor would be a plain Tensor even when the outputs are
    # DTensors (which the op refuses to mix).
    ctx.set_materialize_grads(False)


def _prefill_backward(ctx, dout, dlse, dmem):
    q, k, v, q_sel, k_sel, out, lse = ctx.saved_tensors
    if dout is None:  # only lse or mem reached the loss
        dout = torch.zeros_like(out)
    # Incoming gradients may be expanded or transposed (e.g. from .sum()); the op only needs a
    # contiguous last dim, which keeps the common case copy-free.
    dout = _last_dim_contiguous(dout)
    # Without mem_tau, mem is an empty placeholder and its gradient means nothing.
    if ctx.mem_tau is None:
        dmem = None
    dq, dk, dv, dq_sel, dk_sel = prefill_bwd(dout, q, k, v, q_sel, k_sel, out, lse, dlse,
                                             ctx.scale, dmem, ctx.mem_tau)
    return dq, dk, dv, dq_sel, dk_sel, None, None


torch.library.register_autograd("selattn::prefill_fwd", _prefill_backward,
                                setup_context=_prefill_setup_context)


# --- decode (DESIGN §3): one step of the pruned KV cache; see selattn_ext/cache.py ----------

__all__ += ["decode_step"]


def decode_step(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, f: Tensor,
                pos: Tensor, seq_len: Tensor, lengths: Optional[Tensor], scale: float,
                sel_head: int, budget: int, tau: Optional[float],
                workspace: Optional[Tensor] = None) -> Tensor:
    """Raw decode op: updates the cache tensors in place, returns out. Prefer
    :func:`selattn_ext.decode` with a :class:`selattn_ext.SelectiveKVCache`. ``workspace``
    (CUDA): a uint8 scratch tensor reused across steps, at least
    ``torch.ops.selattn.decode_cuda_workspace_bytes(...)`` bytes (allocated per call if None)."""
    return torch.ops.selattn.decode_step.default(q, k, v, k_cache, v_cache, f, pos, seq_len,
                                                 lengths, scale, sel_head, budget, tau, workspace)


@torch.library.register_fake("selattn::decode_step")
def _decode_step_fake(q, k, v, k_cache, v_cache, f, pos, seq_len, lengths, scale, sel_head,
                      budget, tau, workspace=None):
    # Mirrors csrc/ops.cpp: a contiguous output shaped like q; the cache is mutated in place.
    return q.new_empty(q.shape)


# --- prefill_varlen (DESIGN §1.1): packed ragged batches; see selattn_ext/attention.py ------

__all__ += ["prefill_varlen_fwd", "prefill_varlen_bwd"]


def prefill_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, q_sel: Tensor, k_sel: Tensor,
                       cu_seqlens: Tensor, max_seqlen: int, scale: float,
                       mem_tau: Optional[float] = None) -> Tuple[Tensor, ...]:
    """Raw packed forward: q (total, Hq, D), k/v (total, Hkv, D), q_sel/k_sel (total, D),
    cu_seqlens int32 (B + 1,). Returns (out (total, Hq, D), lse (Hq, total)), plus
    ``mem`` (total,) (the row sums R of each token within its own sequence) when ``mem_tau`` is
    given. Prefer :func:`selattn_ext.attention_varlen`."""
    out, lse, mem = torch.ops.selattn.prefill_varlen_fwd.default(
        q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, scale, mem_tau)
    return (out, lse) if mem_tau is None else (out, lse, mem)


def prefill_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, q_sel: Tensor,
                       k_sel: Tensor, cu_seqlens: Tensor, max_seqlen: int, out: Tensor,
                       lse: Tensor, dlse: Optional[Tensor], scale: float,
                       dmem: Optional[Tensor] = None, mem_tau: Optional[float] = None,
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Raw packed backward: returns (dq, dk, dv, dq_sel, dk_sel)."""
    return torch.ops.selattn.prefill_varlen_bwd.default(
        dout, q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, out, lse, dlse, scale, dmem,
        mem_tau)


def _check_varlen_fake(q: Tensor, cu_seqlens: Tensor, **others: Tensor) -> None:
    # What the C++ op would refuse before reading any data, so torch.compile fails the same way.
    _check_same_device(q, cu_seqlens=cu_seqlens, **others)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"selattn: cu_seqlens must be int32 (as in flash_attn_varlen_func), "
                        f"got {cu_seqlens.dtype}")


@torch.library.register_fake("selattn::prefill_varlen_fwd")
def _prefill_varlen_fwd_fake(q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, scale,
                             mem_tau=None):
    _check_varlen_fake(q, cu_seqlens, k=k, v=v, q_sel=q_sel, k_sel=k_sel)
    if mem_tau is not None and not (math.isfinite(mem_tau) and mem_tau > 0):
        raise ValueError(f"selattn: mem_tau (memory_tau) must be a positive finite number, "
                         f"got {mem_tau}")
    total, hq, _ = q.shape
    # Mirrors csrc/ops.cpp: out = empty_like(q), lse (Hq, total), mem (total,) or (0,).
    stats = _stats_dtype(q.dtype)
    mem = q.new_empty((total,) if mem_tau is not None else (0,), dtype=stats)
    return torch.empty_like(q), q.new_empty((hq, total), dtype=stats), mem


@torch.library.register_fake("selattn::prefill_varlen_bwd")
def _prefill_varlen_bwd_fake(dout, q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, out, lse,
                             dlse, scale, dmem=None, mem_tau=None):
    _check_varlen_fake(q, cu_seqlens, dout=dout, k=k, v=v, q_sel=q_sel, k_sel=k_sel, out=out,
                       lse=lse, dlse=dlse, dmem=dmem)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(q_sel), torch.empty_like(k_sel))


def _prefill_varlen_setup_context(ctx, inputs, output):
    q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen, scale = inputs[:8]
    mem_tau = inputs[8] if len(inputs) > 8 else None
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, q_sel, k_sel, cu_seqlens, out, lse)
    ctx.max_seqlen, ctx.scale, ctx.mem_tau = max_seqlen, scale, mem_tau
    ctx.set_materialize_grads(False)  # as in _prefill_setup_context


def _prefill_varlen_backward(ctx, dout, dlse, dmem):
    q, k, v, q_sel, k_sel, cu_seqlens, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dout = _last_dim_contiguous(dout)
    if ctx.mem_tau is None:
        dmem = None
    grads = prefill_varlen_bwd(dout, q, k, v, q_sel, k_sel, cu_seqlens, ctx.max_seqlen, out,
                               lse, dlse, ctx.scale, dmem, ctx.mem_tau)
    return (*grads, None, None, None, None)


torch.library.register_autograd("selattn::prefill_varlen_fwd", _prefill_varlen_backward,
                                setup_context=_prefill_varlen_setup_context)
