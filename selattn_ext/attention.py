"""``selattn_ext.attention``: the public fused selective-attention prefill (DESIGN §1, §5)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor

from . import ops
from .reference import selection_inputs

__all__ = ["attention"]


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
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
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

    Position 0 is the BOS token and is never masked; every query sees itself. Token j's
    logit for query i is lowered by ``F[i, j] = sum_{j < k < i} relu(s * q_sel[k] . k_sel[j])``.
    Gradients flow to every input, including through F.

    Returns:
        ``out`` (B, Hq, N, D) in the dtype of q (strides of q when q is dense), or
        ``(out, lse)`` if ``return_lse``.
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
    out, lse = ops.prefill_fwd(q, k, v, q_sel, k_sel, float(scale))
    return (out, lse) if return_lse else out
