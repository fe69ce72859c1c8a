"""torch.autograd.gradcheck of the fused op in fp64 on tiny shapes, with the gradient through
F exercised (selection logits large enough that F > 1, none within gradcheck's step of the relu
kink)."""

import torch
from torch.autograd import gradcheck

import selattn_ext
from selattn_ext import reference
from prefill_cases import STD, assert_f_matters, skip_if_unsupported


def head_dim(device):
    return 4 if device == "cpu" else 32  # CUDA only has kernels for some head dims


def leaf(*shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * STD
    return t.to(device).requires_grad_()


def away_from_kink(q_sel, k_sel, scale, margin=1e-3):
    a = scale * q_sel.detach() @ k_sel.detach().transpose(-1, -2)
    assert a.abs().min() > margin, "a selection logit sits on the relu kink; change the seed"


def test_gradcheck_sel_head_gqa(device):
    D = head_dim(device)
    skip_if_unsupported(device, torch.float64, D)
    B, Hq, Hkv, N, sh = 1, 4, 2, 7, 3
    q = leaf(B, Hq, N, D, device=device, seed=1)
    k = leaf(B, Hkv, N, D, device=device, seed=2)
    v = leaf(B, Hkv, N, D, device=device, seed=3)
    q_sel, k_sel = reference.selection_inputs(q, k, sh)
    assert_f_matters(q_sel, k_sel, D ** -0.5)
    away_from_kink(q_sel, k_sel, D ** -0.5)
    assert gradcheck(lambda q, k, v: selattn_ext.attention(q, k, v, sel_head=sh,
                                                           return_lse=True), (q, k, v))


def test_gradcheck_explicit_selection_inputs(device):
    D = head_dim(device)
    skip_if_unsupported(device, torch.float64, D)
    B, Hq, Hkv, N = 2, 2, 1, 6
    q = leaf(B, Hq, N, D, device=device, seed=4)
    k = leaf(B, Hkv, N, D, device=device, seed=5)
    v = leaf(B, Hkv, N, D, device=device, seed=6)
    q_sel = leaf(B, N, D, device=device, seed=7)
    k_sel = leaf(B, N, D, device=device, seed=8)
    assert_f_matters(q_sel, k_sel, D ** -0.5)
    away_from_kink(q_sel, k_sel, D ** -0.5)
    assert gradcheck(lambda *t: selattn_ext.attention(*t[:3], q_sel=t[3], k_sel=t[4], scale=0.6,
                                                       return_lse=True),
                     (q, k, v, q_sel, k_sel))


def test_gradcheck_transposed_layout_and_sliced_selection(device):
    """q/k/v passed as (B, N, H, D).transpose(1, 2) views; q_sel/k_sel as column slices of one
    wider projection (row stride 2 D)."""
    D = head_dim(device)
    skip_if_unsupported(device, torch.float64, D)
    B, Hq, Hkv, N = 1, 3, 1, 6
    q = leaf(B, N, Hq, D, device=device, seed=9)
    k = leaf(B, N, Hkv, D, device=device, seed=10)
    v = leaf(B, N, Hkv, D, device=device, seed=11)
    sel = leaf(B, N, 2 * D, device=device, seed=12)
    assert_f_matters(sel[..., :D], sel[..., D:], D ** -0.5)
    away_from_kink(sel[..., :D], sel[..., D:], D ** -0.5)

    def fn(q, k, v, sel):
        return selattn_ext.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     q_sel=sel[..., :D], k_sel=sel[..., D:], return_lse=True)

    assert gradcheck(fn, (q, k, v, sel))


def test_gradient_reaches_selection_inputs(device):
    """Not stop-gradient: d(q_sel), d(k_sel) are nonzero and match the reference."""
    D = head_dim(device)
    skip_if_unsupported(device, torch.float64, D)
    B, Hq, Hkv, N = 1, 2, 2, 12
    ins = [leaf(B, Hq, N, D, device=device, seed=13), leaf(B, Hkv, N, D, device=device, seed=14),
           leaf(B, Hkv, N, D, device=device, seed=15), leaf(B, N, D, device=device, seed=16),
           leaf(B, N, D, device=device, seed=17)]
    res = []
    for fn in (selattn_ext.attention, reference.attention):
        out = fn(*ins[:3], q_sel=ins[3], k_sel=ins[4])
        res.append(torch.autograd.grad(out.square().sum(), ins[3:]))
    for ours, ref in zip(*res):
        assert ours.abs().max() > 1e-2
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
