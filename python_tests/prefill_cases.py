"""Shared helpers for the prefill tests: input generation, the FlashAttention tolerance rule,
and the covering design over shape / dtype / layout axes (DESIGN §7)."""

from __future__ import annotations

import functools
import itertools
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

import selattn_ext
from selattn_ext import reference

# q, k entries ~ N(0, STD^2) give scaled logits s * q.k with std STD^2 = 1.69 (>= 1, DESIGN §7),
# so relu(A) is often > 1 and F (a sum of them) dominates the logits of distant keys.
STD = 1.3
CUDA_HEAD_DIMS = (32, 64, 96, 128, 256)


@dataclass(frozen=True)
class Case:
    """One prefill problem. ``layout="bnhd"`` stores q/k/v as (B, N, H, D) and passes
    ``.transpose(1, 2)`` views; ``sel`` picks the selection inputs: ``"head"`` (sel_head),
    ``"explicit"`` (independent (B, N, D) tensors) or ``"view"`` (independent tensors that are
    column slices of wider projections, so their row stride is not D)."""

    B: int = 1
    Hq: int = 2
    Hkv: int = 1
    N: int = 16
    D: int = 16
    dtype: torch.dtype = torch.float32
    sel_head: int = 0
    layout: str = "bhnd"
    sel: str = "head"
    lse_loss: bool = True
    scale: Optional[float] = None  # None: the op's default, D ** -0.5

    @property
    def effective_scale(self) -> float:
        return self.D ** -0.5 if self.scale is None else self.scale

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return (f"B{self.B}-H{self.Hq}x{self.Hkv}-N{self.N}-D{self.D}-{dt}-{self.layout}-"
                f"{self.sel}{self.sel_head if self.sel == 'head' else ''}"
                f"{'-lse' if self.lse_loss else ''}"
                f"{'' if self.scale is None else f'-s{self.scale:.3g}'}")

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


def skip_if_unsupported(device: str, dtype: torch.dtype, head_dim: int) -> None:
    """The CPU path takes every dtype and head_dim <= 256; CUDA only some (ops.cpp says which)."""
    if not supported(device, dtype, head_dim):
        pytest.skip(f"no CUDA kernel for head_dim {head_dim} / {dtype}")


def supported(device: str, dtype: torch.dtype, head_dim: int) -> bool:
    return device != "cuda" or _cuda_supports(dtype, head_dim)


@functools.lru_cache(maxsize=None)
def _cuda_supports(dtype: torch.dtype, head_dim: int) -> bool:
    t = torch.zeros(1, 1, 2, head_dim, dtype=dtype, device="cuda")
    try:
        torch.ops.selattn.prefill_fwd(t, t, t, t[:, 0], t[:, 0], 1.0)
    except ValueError as e:
        if "no CUDA kernel" in str(e):
            return False
        raise
    return True


def randn(shape: Sequence[int], gen: torch.Generator, std: float = STD) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * std


def make_leaves(case: Case, device: str, std: float = STD) -> Dict[str, torch.Tensor]:
    """Fresh random storage tensors for ``case`` in ``case.dtype`` (the tensors gradients are
    taken with respect to). :func:`as_inputs` turns them into the op's arguments."""
    gen = torch.Generator().manual_seed(case.seed)
    B, Hq, Hkv, N, D = case.B, case.Hq, case.Hkv, case.N, case.D
    if case.layout == "bhnd":
        shapes = {"q": (B, Hq, N, D), "k": (B, Hkv, N, D), "v": (B, Hkv, N, D)}
    else:
        shapes = {"q": (B, N, Hq, D), "k": (B, N, Hkv, D), "v": (B, N, Hkv, D)}
    if case.sel == "explicit":
        shapes.update(q_sel=(B, N, D), k_sel=(B, N, D))
    elif case.sel == "view":
        shapes.update(q_sel=(B, N, 2 * D), k_sel=(B, N, 3 * D))
    leaves = {}
    for name, shape in shapes.items():
        t = randn(shape, gen, 1.0 if name == "v" else std)
        leaves[name] = t.to(case.dtype).to(device)
    return leaves


def as_inputs(case: Case, leaves: Dict[str, torch.Tensor]):
    """(q, k, v, q_sel, k_sel) views of the leaves; q_sel/k_sel are None for ``sel="head"``."""
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    if case.layout == "bnhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q_sel = k_sel = None
    if case.sel == "explicit":
        q_sel, k_sel = leaves["q_sel"], leaves["k_sel"]
    elif case.sel == "view":
        q_sel, k_sel = leaves["q_sel"][..., : case.D], leaves["k_sel"][..., case.D: 2 * case.D]
    return q, k, v, q_sel, k_sel


def selection_of(case: Case, leaves: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k, _, q_sel, k_sel = as_inputs(case, leaves)
    if q_sel is None:
        q_sel, k_sel = reference.selection_inputs(q, k, case.sel_head)
    return q_sel, k_sel


def assert_f_matters(q_sel: torch.Tensor, k_sel: torch.Tensor, scale: float) -> None:
    """The inputs must make F non-trivial (DESIGN §7): some entries exceed 1."""
    f = reference.accumulated_selection(q_sel.detach().double().cpu(),
                                        k_sel.detach().double().cpu(), scale)
    assert (f > 1).any(), f"F is trivial for these inputs (max {f.max().item():.3g})"


def run_prefill(fn: Callable, case: Case, leaves: Dict[str, torch.Tensor], dout: torch.Tensor,
                dlse: Optional[torch.Tensor], grads: bool = True) -> Dict[str, torch.Tensor]:
    """Calls ``fn`` (selattn_ext.attention or reference.attention) with return_lse=True, then
    backpropagates ``<out, dout> (+ <lse, dlse>)`` to every leaf. Returns out, lse and
    ``d<leaf>`` for each leaf, all detached."""
    leaves = {n: t.detach().requires_grad_(grads) for n, t in leaves.items()}
    q, k, v, q_sel, k_sel = as_inputs(case, leaves)
    out, lse = fn(q, k, v, scale=case.scale, sel_head=case.sel_head, q_sel=q_sel, k_sel=k_sel,
                  return_lse=True)
    res = {"out": out.detach(), "lse": lse.detach()}
    if grads:
        loss = (out * dout.to(out.dtype)).sum()
        if dlse is not None:
            loss = loss + (lse * dlse.to(lse.dtype)).sum()
        names = list(leaves)
        for n, g in zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])):
            res["d" + n] = g
    return res


def cotangents(case: Case, device: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(case.seed + 1)
    dout = randn((case.B, case.Hq, case.N, case.D), gen, 1.0).to(device)
    dlse = randn((case.B, case.Hq, case.N), gen, 1.0).to(device) if case.lse_loss else None
    return dout, dlse


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_fa_close(name: str, ours: torch.Tensor, eager_lowprec: torch.Tensor,
                    oracle: torch.Tensor, factor: float) -> None:
    """FlashAttention's rule: |ours - oracle| <= factor * |eager_lowprec - oracle| + 1e-5, with
    the oracle in fp64 and eager_lowprec the same math in the test dtype. For fp64 inputs the
    two baselines coincide, so the bound is a relative 1e-9 instead."""
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = max_err(ours, oracle)
    if eager_lowprec.dtype == torch.float64:
        bound = 1e-9 * (1.0 + oracle.abs().max().item() if oracle.numel() else 1.0)
        assert err <= bound, f"{name}: fp64 max error {err:.3g} > {bound:.3g}"
        return
    base = max_err(eager_lowprec, oracle)
    bound = factor * base + 1e-5
    assert err <= bound, (f"{name}: max error {err:.3g} > {factor} * eager {eager_lowprec.dtype} "
                          f"error {base:.3g} + 1e-5")


def check_against_reference(case: Case, device: str, grads: bool, std: float = STD) -> None:
    """Runs ``case`` through selattn_ext.attention, the reference in the test dtype and the fp64
    reference, and applies the tolerance rule to out, lse and (if ``grads``) every gradient.
    ``std``: of the q / k (and selection) inputs."""
    skip_if_unsupported(device, case.dtype, case.D)
    leaves = make_leaves(case, device, std)
    if case.N >= 17:
        q_sel, k_sel = selection_of(case, leaves)
        assert_f_matters(q_sel, k_sel, case.effective_scale)
    dout, dlse = cotangents(case, device)
    ours = run_prefill(selattn_ext.attention, case, leaves, dout, dlse, grads)
    low = run_prefill(reference.attention, case, leaves, dout, dlse, grads)
    oracle = run_prefill(reference.attention, case,
                         {n: t.double() for n, t in leaves.items()}, dout.double(),
                         None if dlse is None else dlse.double(), grads)

    q = as_inputs(case, leaves)[0]
    out, lse = ours["out"], ours["lse"]
    assert out.dtype == case.dtype and lse.dtype == (
        torch.float64 if case.dtype == torch.float64 else torch.float32)
    assert lse.shape == (case.B, case.Hq, case.N) and lse.is_contiguous()
    # Every q here is dense (contiguous or a transposed contiguous tensor).
    assert out.stride() == q.stride(), "out must take the strides of a dense q"
    for name in ours:
        assert_fa_close(name, ours[name], low[name], oracle[name],
                        factor=3.0 if name.startswith("d") else 2.0)
    # lse is an fp32 output whose eager low-precision baseline is rounded to bf16/fp16, which
    # makes the rule above loose for it; the products of rounded inputs are exact in fp32, so
    # it must also be fp32-accurate in absolute terms.
    if case.dtype != torch.float64 and lse.numel():
        err = max_err(lse, oracle["lse"])
        bound = 1e-3 * (1.0 + oracle["lse"].abs().max().item())
        assert err <= bound, f"lse: max error {err:.3g} > {bound:.3g} (fp32 accuracy)"


# ---------------------------------------------------------------------------------------------
# Covering design: every value of every axis appears, and every pair of values of the listed
# axes appears in some case. The full product of the grid is ~200k cases; this is ~40.

GRID_AXES: Dict[str, list] = {
    # One trivial length (N = 1: F is zero); the rest cross the CUDA 32/64-row tiles, the CPU
    # kernel's 128-row query block and 256-key tile (exact multiples and one past).
    "N": [1, 17, 33, 64, 97, 129, 257, 520],
    "dtype": [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    "D": [8, 32, 64, 128],
    "heads": [(1, 1), (4, 4), (8, 2), (6, 1)],
    "sel": ["head", "explicit", "view"],
    "layout": ["bhnd", "bnhd"],
    "sel_head": [0, -1],
    "B": [1, 2],
    "lse_loss": [True, False],
}
# sel_head only matters on the sel="head" path; B and lse_loss just need to appear.
GRID_PAIRS: List[Tuple[str, str]] = [
    (a, b) for a, b in itertools.combinations(["N", "dtype", "D", "heads", "sel", "layout"], 2)
] + [("sel_head", "heads"), ("sel_head", "dtype"), ("B", "N"), ("lse_loss", "dtype")]


def covering_rows(axes: Dict[str, list], pairs: List[Tuple[str, str]]) -> List[Dict[str, object]]:
    """Greedy pairwise covering (deterministic): each row starts from the first uncovered pair
    and fills the other axes with the value that covers most still-uncovered pairs."""
    names = list(axes)
    idx_pairs = [(names.index(a), names.index(b)) for a, b in pairs]
    uncovered = {(a, va, b, vb) for a, b in idx_pairs
                 for va in range(len(axes[names[a]])) for vb in range(len(axes[names[b]]))}
    use_count = [[0] * len(axes[n]) for n in names]
    rows = []
    while uncovered:
        a, va, b, vb = min(uncovered)
        row: List[Optional[int]] = [None] * len(names)
        row[a], row[b] = va, vb
        for ax in range(len(names)):
            if row[ax] is not None:
                continue

            def gain(val: int, ax: int = ax) -> Tuple[int, int]:
                g = 0
                for p, q in idx_pairs:
                    if p == ax and row[q] is not None:
                        g += (ax, val, q, row[q]) in uncovered
                    elif q == ax and row[p] is not None:
                        g += (p, row[p], ax, val) in uncovered
                return g, -use_count[ax][val]

            row[ax] = max(range(len(axes[names[ax]])), key=gain)
        for p, q in idx_pairs:
            uncovered.discard((p, row[p], q, row[q]))
        for ax, val in enumerate(row):
            use_count[ax][val] += 1
        rows.append({n: axes[n][v] for n, v in zip(names, row)})
    return rows


def grid_cases() -> List[Case]:
    cases = []
    for r in covering_rows(GRID_AXES, GRID_PAIRS):
        hq, hkv = r["heads"]
        cases.append(Case(B=r["B"], Hq=hq, Hkv=hkv, N=r["N"], D=r["D"], dtype=r["dtype"],
                          sel_head=r["sel_head"], layout=r["layout"], sel=r["sel"],
                          lse_loss=r["lse_loss"]))
    return cases
