"""``selattn_ext.attention`` and ``attention_varlen``: the public fused selective-attention
prefill, dense and packed (DESIGN §1, §1.1, §5)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .memory import memory_from_rowsum
from .reference import selection_inputs

__all__ = ["attention", "attention_varlen"]


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
) -> Union[Tensor, Tuple[Tensor, ...]]:
    """Causal selective attention (Leviathan et al., 2024), fused.

    Args:
        q: (B, Hq, N, D) queries, SDPA layout; any strides with a contiguous last dim, so a
            (B, N, H, D) projection output passed as ``.transpose(1, 2)`` needs no copy.
        k, v: (B, Hkv, N, D) with ``Hq % Hkv == 0`` (GQA/MQA: head h reads kv head h // g).
        scale: logit scale for both attention and selection; default ``D ** -0.5``.
        sel_head: query head whose logits select (negative counts from the end). Ignored when
            ``q_sel``/``k_sel`` are given.
        q_sel, k_sel: (B, N, D) explicit selection queries/keys (e.g. a dedicated projection,
            or head 0 living on another tensor-parallel rank). Give both or neither.
        return_lse: also return the fp32 (fp64 for fp64 inputs) log-sum-exp (B, Hq, N).
        memory_tau: also return the memory M (B, N) of the paper's auxiliary memory loss, with
            this clip level tau (> 0, finite): ``M[b, i] = (i + 1) - sum_{j <= i}
            min(F[b, i, j], tau) / tau``, the number of tokens query i still attends to when a
            token counts as masked in proportion to F / tau (fully at F >= tau). Computed in
            the fused kernel (no N x N), differentiable; feed the layers' M to
            :func:`selattn_ext.memory_loss`.

    Position 0 is the BOS token and is never masked; every query sees itself. Token j's
    logit for query i is lowered by ``F[i, j] = sum_{j < k < i} relu(s * q_sel[k] . k_sel[j])``.
    Gradients flow to every input, including through F.

    Returns:
        ``out`` (B, Hq, N, D) in the dtype of q (strides of q when q is dense), or a tuple
        ``(out, [lse], [M])`` with ``lse`` if ``return_lse`` and ``M`` (lse's dtype) if
        ``memory_tau`` is given.
    """
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got {t.dim()}-D")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if (q_sel is None) != (k_sel is None):
        raise ValueError("q_sel and k_sel must be given together (got only "
                         f"{'q_sel' if k_sel is None else 'k_sel'})")
    if q_sel is None:
        q_sel, k_sel = selection_inputs(q, k, sel_head)
    if memory_tau is None:
        out, lse = ops.prefill_fwd(q, k, v, q_sel, k_sel, float(scale))
        return (out, lse) if return_lse else out
    out, lse, rowsum = ops.prefill_fwd(q, k, v, q_sel, k_sel, float(scale), float(memory_tau))
    mem = memory_from_rowsum(rowsum, float(memory_tau))
    return (out, lse, mem) if return_lse else (out, mem)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    scale: Optional[float] = None,
    sel_head: int = 0,
    q_sel: Optional[Tensor] = None,
    k_sel: Optional[Tensor] = None,
    return_lse: bool = False,
    memory_tau: Optional[float] = None,
) -> Union[Tensor, Tuple[Tensor, ...]]:
    """Selective attention over packed sequences (DESIGN §1.1), as ``flash_attn_varlen_func``.

    Sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of the packed tensors; it is
    attended exactly as :func:`attention` would attend it alone: its first token is its BOS,
    its F is built from its own rows only, and it sees none of the other sequences' keys.

    Args:
        q: (total, Hq, D) packed queries; any strides with a contiguous last dim (e.g. a slice
            of a fused qkv projection).
        k, v: (total, Hkv, D) with ``Hq % Hkv == 0``.
        cu_seqlens: int32 (B + 1,) on q's device: 0, then the cumulative sequence lengths,
            ending at ``total``. Zero-length sequences are allowed.
        max_seqlen: an int >= the longest sequence (as in FlashAttention; the bound is checked).
        scale, sel_head, q_sel, k_sel: as in :func:`attention`; q_sel/k_sel are (total, D).
        return_lse: also return the log-sum-exp, (Hq, total) in fp32 (fp64 for fp64 inputs),
            FlashAttention's varlen layout.
        memory_tau: also return the memory M (total,) of the auxiliary memory loss, each token
            counted within its own sequence (see :func:`attention`).

    CPU and CUDA (the same SIMT / tensor-core kernels as :func:`attention`, in their varlen
    mode). ``cu_seqlens`` is read on the host once per call (on CUDA a small device-to-host
    copy).

    Returns:
        ``out`` (total, Hq, D), or ``(out, [lse], [M])`` as in :func:`attention`.
    """
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total, H, D), got {t.dim()}-D")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if (q_sel is None) != (k_sel is None):
        raise ValueError("q_sel and k_sel must be given together (got only "
                         f"{'q_sel' if k_sel is None else 'k_sel'})")
    if q_sel is None:
        q_sel, k_sel = selection_inputs(q, k, sel_head)
    if memory_tau is None:
        out, lse = ops.prefill_varlen_fwd(q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen,
                                          float(scale))
        return (out, lse) if return_lse else out
    out, lse, rowsum = ops.prefill_varlen_fwd(q, k, v, q_sel, k_sel, cu_seqlens, max_seqlen,
                                              float(scale), float(memory_tau))
    mem = _positions_in_sequence(cu_seqlens, rowsum.shape[0]).to(rowsum.dtype) + 1
    mem = mem - rowsum / float(memory_tau)
    return (out, lse, mem) if return_lse else (out, mem)


def _positions_in_sequence(cu_seqlens: Tensor, total: int) -> Tensor:
    """Each packed token's position within its own sequence (int64, (total,)), no host sync."""
    rows = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
    cu = cu_seqlens.to(torch.int64)
    # Sequence of row t: the number of sequence ends <= t (empty sequences end where they start).
    seq = torch.searchsorted(cu[1:], rows, right=True)
    return rows - cu[seq]
