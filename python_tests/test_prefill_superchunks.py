"""CPU prefill with its query blocks in superchunks (bounded Poff workspace, DESIGN §4).

SELATTN_CPU_SUPERCHUNK_BLOCKS=n forces superchunks of n query blocks (128 rows each), so short
sequences exercise the carried column sums: the forward's running carry, and the backward's
pre-pass up to its top superchunk followed by one retreat per superchunk, with dk / dv and the
dF suffix state handed from one superchunk to the next. Every case is checked against the
fp64 reference with the tolerance rule of DESIGN §7."""

import pytest
import torch

import selattn_ext
from prefill_cases import Case, as_inputs, assert_fa_close, check_against_reference, cotangents, \
    make_leaves, run_prefill
from selattn_ext import reference

ENV = "SELATTN_CPU_SUPERCHUNK_BLOCKS"

# N not a multiple of the 128-row block (300, 700, 1000) and superchunks that do not divide
# the block count (700 rows = 6 blocks in superchunks of 4), GQA head chunks, B = 2, layouts.
CASES = [
    (Case(B=1, Hq=2, Hkv=1, N=300, D=16, dtype=torch.float64), 1),
    (Case(B=2, Hq=4, Hkv=2, N=700, D=32, dtype=torch.float64, sel="explicit"), 4),
    (Case(B=1, Hq=6, Hkv=1, N=1000, D=64, dtype=torch.float32, layout="bnhd"), 2),
    (Case(B=2, Hq=4, Hkv=4, N=520, D=32, dtype=torch.float32, sel="view", lse_loss=False), 1),
    (Case(B=1, Hq=4, Hkv=2, N=400, D=64, dtype=torch.bfloat16), 1),
    (Case(B=1, Hq=2, Hkv=2, N=300, D=32, dtype=torch.float16, sel_head=-1), 2),
]


@pytest.mark.parametrize("case,blocks", CASES, ids=[f"{c.id}-sc{b}" for c, b in CASES])
@pytest.mark.parametrize("grads", [False, True], ids=["fwd", "fwdbwd"])
def test_superchunks_match_reference(case, blocks, grads, monkeypatch):
    monkeypatch.setenv(ENV, str(blocks))
    check_against_reference(case, "cpu", grads=grads)


@pytest.mark.parametrize("blocks", [1, 3])
def test_superchunks_agree_with_one_superchunk(blocks, monkeypatch):
    """Same inputs with and without forced superchunks: the forward adds the carry in the same
    order (same F bits), the backward's retreat differs by double rounding only."""
    case = Case(B=2, Hq=4, Hkv=2, N=777, D=32, dtype=torch.float32, sel="explicit")
    leaves = make_leaves(case, "cpu")
    dout, dlse = cotangents(case, "cpu")
    monkeypatch.delenv(ENV, raising=False)
    whole = run_prefill(selattn_ext.attention, case, leaves, dout, dlse)
    monkeypatch.setenv(ENV, str(blocks))
    split = run_prefill(selattn_ext.attention, case, leaves, dout, dlse)
    for name in whole:
        scale = 1.0 + whole[name].abs().max().item()
        err = (whole[name] - split[name]).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: superchunks of {blocks} differ by {err:.3g}"


@pytest.mark.parametrize("blocks", [1, 2])
def test_superchunks_memory_loss(blocks, monkeypatch):
    """The memory loss sums R per row and adds dmem to dF once per tile: with superchunks too."""
    monkeypatch.setenv(ENV, str(blocks))
    case = Case(B=2, Hq=4, Hkv=2, N=420, D=16, dtype=torch.float64)
    leaves = make_leaves(case, "cpu")
    dout, dlse = cotangents(case, "cpu")
    dmem = torch.randn(case.B, case.N, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)

    def run(fn):
        ls = {n: t.detach().requires_grad_() for n, t in leaves.items()}
        q, k, v, q_sel, k_sel = as_inputs(case, ls)
        out, lse, mem = fn(q, k, v, return_lse=True, memory_tau=3.0)
        loss = (out * dout).sum() + (lse * dlse).sum() + (mem * dmem).sum()
        names = list(ls)
        res = {"out": out.detach(), "lse": lse.detach(), "M": mem.detach()}
        for n, g in zip(names, torch.autograd.grad(loss, [ls[n] for n in names])):
            res["d" + n] = g
        return res

    ours, oracle = run(selattn_ext.attention), run(reference.attention)
    for name in ours:
        assert_fa_close(name, ours[name], oracle[name], oracle[name], factor=1.0)


def test_gradcheck_across_superchunks(monkeypatch):
    """fp64 gradcheck (fast mode: random projections) with one 128-row block per superchunk and
    N = 260 (three blocks, the last one partial), the selection taken from head 0 of q / k."""
    from torch.autograd import gradcheck

    from prefill_cases import STD, assert_f_matters

    monkeypatch.setenv(ENV, "1")
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, N, D = 1, 2, 1, 260, 4
    q, k, v = [(torch.randn(B, h, N, D, generator=g, dtype=torch.float64) * STD).requires_grad_()
               for h in (Hq, Hkv, Hkv)]
    q_sel, k_sel = reference.selection_inputs(q, k, 0)
    assert_f_matters(q_sel, k_sel, D ** -0.5)
    a = D ** -0.5 * q_sel.detach() @ k_sel.detach().transpose(-1, -2)
    assert a.abs().min() > 1e-5, "a selection logit sits on the relu kink; change the seed"
    assert gradcheck(lambda q, k, v: selattn_ext.attention(q, k, v, return_lse=True), (q, k, v),
                     fast_mode=True)
