"""The auxiliary memory loss: M from the fused prefill (``memory_tau``), its gradients, the
layer loss ``selattn_ext.memory_loss``, the raw ops' ``mem_tau`` / ``dmem``, and the module flag.

M[b, i] = (i + 1) - sum_{j <= i} min(F[b, i, j], tau) / tau; every check is against the eager
reference (``reference.attention(..., memory_tau=...)``, which materialises F)."""

import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.library import opcheck

import selattn_ext
from selattn_ext import reference
from selattn_ext.nn import SelectiveSelfAttention
from prefill_cases import (STD, Case, as_inputs, assert_f_matters, assert_fa_close, cotangents,
                           make_leaves, selection_of, skip_if_unsupported)


def fused_and_reference(case: Case, leaves, tau: float, dout, dlse, dmem, fn):
    """Runs ``fn`` (selattn_ext.attention or reference.attention) with lse and M, backpropagates
    ``<out, dout> + <lse, dlse> + <M, dmem>`` to every leaf; returns outputs and gradients."""
    leaves = {n: t.detach().requires_grad_() for n, t in leaves.items()}
    q, k, v, q_sel, k_sel = as_inputs(case, leaves)
    out, lse, mem = fn(q, k, v, scale=case.scale, sel_head=case.sel_head, q_sel=q_sel,
                       k_sel=k_sel, return_lse=True, memory_tau=tau)
    loss = (out * dout.to(out.dtype)).sum() + (mem * dmem.to(mem.dtype)).sum()
    if dlse is not None:
        loss = loss + (lse * dlse.to(lse.dtype)).sum()
    names = list(leaves)
    res = {"out": out.detach(), "lse": lse.detach(), "M": mem.detach()}
    for n, g in zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])):
        res["d" + n] = g
    return res


# N = 300 spans three query blocks (128 rows) and two key tiles (256) of the CPU kernel;
# Hq / Hkv > 1 make both kernels split heads across work items (the R sum and the dmem term
# must still count once per batch element).
MEM_CASES = [
    (Case(B=2, Hq=4, Hkv=2, N=37, D=16, dtype=torch.float64), 1.0),
    (Case(B=1, Hq=8, Hkv=4, N=300, D=32, dtype=torch.float64, sel="explicit"), 2.5),
    (Case(B=2, Hq=3, Hkv=1, N=130, D=16, dtype=torch.float64, layout="bnhd", sel="view"), 0.3),
    (Case(B=1, Hq=4, Hkv=4, N=300, D=64, dtype=torch.float32, sel_head=-1), 1.0),
    (Case(B=2, Hq=6, Hkv=2, N=77, D=32, dtype=torch.float32, sel="explicit", lse_loss=False),
     4.0),
    (Case(B=1, Hq=2, Hkv=1, N=200, D=64, dtype=torch.bfloat16, layout="bnhd"), 1.0),
    (Case(B=1, Hq=2, Hkv=2, N=64, D=32, dtype=torch.float16, sel="explicit"), 0.7),
    # tau far above every F: nothing is clipped, R is the plain row sum of F.
    (Case(B=1, Hq=2, Hkv=1, N=50, D=16, dtype=torch.float64), 1e4),
]


@pytest.mark.parametrize("case,tau", MEM_CASES,
                         ids=[f"{c.id}-tau{t:g}" for c, t in MEM_CASES])
def test_memory_and_gradients_match_reference(case, tau, device):
    skip_if_unsupported(device, case.dtype, case.D)
    leaves = make_leaves(case, device)
    q_sel, k_sel = selection_of(case, leaves)
    assert_f_matters(q_sel, k_sel, case.effective_scale)
    f = reference.accumulated_selection(q_sel.detach().double().cpu(),
                                        k_sel.detach().double().cpu(), case.effective_scale)
    if tau < 1e3:  # the clip must be active on some entries and not on others
        tril = torch.ones(case.N, case.N, dtype=torch.bool).tril()
        assert (f[:, tril] > tau).any() and (f[:, tril] < tau).any()
    dout, dlse = cotangents(case, device)
    dmem = torch.randn(case.B, case.N, generator=torch.Generator().manual_seed(case.seed + 2),
                       dtype=torch.float64).to(device)

    ours = fused_and_reference(case, leaves, tau, dout, dlse, dmem, selattn_ext.attention)
    low = fused_and_reference(case, leaves, tau, dout, dlse, dmem, reference.attention)
    oracle = fused_and_reference(case, {n: t.double() for n, t in leaves.items()}, tau,
                                 dout.double(), None if dlse is None else dlse.double(),
                                 dmem, reference.attention)
    stats = torch.float64 if case.dtype == torch.float64 else torch.float32
    assert ours["M"].dtype == stats and ours["M"].shape == (case.B, case.N)
    for name in ours:
        assert_fa_close(name, ours[name], low[name], oracle[name],
                        factor=3.0 if name.startswith("d") else 2.0)
    # M counts tokens: 1 <= M[i] <= i + 1 up to rounding (BOS and the query are never masked).
    idx = torch.arange(1, case.N + 1, dtype=torch.float64, device=device)
    assert (ours["M"].double() <= idx + 1e-3).all() and (ours["M"].double() >= 1 - 1e-3).all()


def test_memory_gradient_alone_reaches_selection_only(device):
    """A loss on M alone: q / k get gradient only through the selection head's slices, v none;
    all of it matches autograd through the reference in fp64."""
    case = Case(B=2, Hq=4, Hkv=2, N=40, D=32, dtype=torch.float64, sel_head=1)
    leaves = {n: t.detach().requires_grad_() for n, t in make_leaves(case, device).items()}
    grads = {}
    for fn in (selattn_ext.attention, reference.attention):
        q, k, v, _, _ = as_inputs(case, leaves)
        _, mem = fn(q, k, v, sel_head=1, memory_tau=1.5)
        gs = torch.autograd.grad(mem.square().sum(), [leaves[n] for n in "qkv"],
                                 allow_unused=True)  # the reference's M does not use v
        grads[fn] = [torch.zeros_like(leaves[n]) if g is None else g for n, g in zip("qkv", gs)]
    for name, ours, ref in zip("qkv", grads[selattn_ext.attention], grads[reference.attention]):
        torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-9, msg=lambda m: f"d{name}: {m}")
    dq, dk, dv = grads[selattn_ext.attention]
    assert dq[:, 1].abs().max() > 0 and dk[:, 0].abs().max() > 0
    assert dq[:, [0, 2, 3]].abs().max() == 0 and dk[:, 1].abs().max() == 0
    assert dv.abs().max() == 0


def test_clip_boundary_gradient_matches_reference(device):
    """F == tau exactly on several entries: 0 / 1 selection rows make F integer. At F == tau the
    fused backward takes the saturated side (gradient 0, as relu at 0 and torch.clamp from
    torch 2.14); the reference spells that out with torch.where, and <= would differ."""
    B, N, D = 1, 24, 32
    g = torch.Generator().manual_seed(3)
    # Selection rows of 0 / 1 entries with scale 1: every logit is a small integer, F sums them.
    q_sel = torch.randint(0, 2, (B, N, D), generator=g).double().to(device).requires_grad_()
    k_sel = torch.randint(0, 2, (B, N, D), generator=g).double().to(device).requires_grad_()
    q, k, v = (torch.randn(B, 1, N, D, generator=g, dtype=torch.float64).to(device)
               for _ in range(3))
    f = reference.accumulated_selection(q_sel.detach(), k_sel.detach(), 1.0)
    tau = f[f > 0].mode().values.item()  # the most frequent positive F value: the most ties
    assert (f == tau).sum() >= 5 and (f > tau).any(), "too few ties; change the seed"
    dmem = torch.randn(B, N, generator=g, dtype=torch.float64).to(device)
    res = []
    for fn in (selattn_ext.attention, reference.attention):
        _, mem = fn(q, k, v, scale=1.0, q_sel=q_sel, k_sel=k_sel, memory_tau=tau)
        res.append((mem.detach(),) + torch.autograd.grad((mem * dmem).sum(), [q_sel, k_sel]))
    for name, ours, ref in zip(["M", "dq_sel", "dk_sel"], *res):
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0, msg=lambda m: f"{name}: {m}")
    # The ties matter: the closed-interval convention gives another gradient on these inputs.
    f = reference.accumulated_selection(q_sel, k_sel, 1.0)
    closed = torch.where(f <= tau, f, torch.full_like(f, tau)).tril().sum(-1)
    alt = torch.autograd.grad((-closed / tau * dmem).sum(), [q_sel])[0]
    assert (alt - res[0][1]).abs().max() > 1e-3


def _leaf(*shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * STD).to(device).requires_grad_()


def _away_from_kinks(q_sel, k_sel, scale, tau, margin=1e-3):
    a = scale * q_sel.detach() @ k_sel.detach().transpose(-1, -2)
    assert a.abs().min() > margin, "a selection logit sits on the relu kink; change the seed"
    f = reference.accumulated_selection(q_sel.detach(), k_sel.detach(), scale)
    assert (f - tau).abs().min() > margin, "an F entry sits on the clip; change tau"
    assert (f > tau).any(), "the clip is inactive; lower tau"


@pytest.mark.parametrize("sel", ["head", "explicit"])
def test_gradcheck_out_and_memory(sel, device):
    """fp64 gradcheck of (out, lse, M) jointly, so the Jacobian mixes the attention path and the
    memory term of dF."""
    D = 4 if device == "cpu" else 32
    skip_if_unsupported(device, torch.float64, D)
    B, Hq, Hkv, N, tau = 2, 4, 2, 7, 0.9
    q = _leaf(B, Hq, N, D, device=device, seed=21)
    k = _leaf(B, Hkv, N, D, device=device, seed=22)
    v = _leaf(B, Hkv, N, D, device=device, seed=23)
    if sel == "head":
        inputs = (q, k, v)
        qs, ks = reference.selection_inputs(q, k, 2)
        kwargs = dict(sel_head=2)
    else:
        qs, ks = _leaf(B, N, D, device=device, seed=24), _leaf(B, N, D, device=device, seed=25)
        inputs = (q, k, v, qs, ks)
        kwargs = {}
    _away_from_kinks(qs, ks, D ** -0.5, tau)
    assert_f_matters(qs, ks, D ** -0.5)

    def fn(q, k, v, *sel_inputs):
        extra = dict(q_sel=sel_inputs[0], k_sel=sel_inputs[1]) if sel_inputs else {}
        return selattn_ext.attention(q, k, v, return_lse=True, memory_tau=tau, **kwargs, **extra)

    assert gradcheck(fn, inputs)


def test_memory_loss_matches_eager_formula(device):
    """L_mem over three layers (different inputs, sel_head and explicit selection): the value
    equals a literal loop of the documented formula, and its gradient matches the reference."""
    B, Hq, N, D = 3, 2, 45, 16
    layers = [(_leaf(B, Hq, N, D, device=device, seed=30 + 3 * i),
               _leaf(B, 1, N, D, device=device, seed=31 + 3 * i),
               _leaf(B, 1, N, D, device=device, seed=32 + 3 * i)) for i in range(3)]
    taus = [0.5, 1.0, 3.0]
    results = []
    for fn in (selattn_ext.attention, reference.attention):
        mems = [fn(q, k, v, memory_tau=t)[1] for (q, k, v), t in zip(layers, taus)]
        loss = selattn_ext.memory_loss(mems)
        leaves = [t for layer in layers for t in layer[:2]]  # M does not depend on v
        results.append([loss.detach()] + list(torch.autograd.grad(loss, leaves)))

    # Literal formula in fp64 from F: mean over layers and batch of max_i M_i.
    total = 0.0
    for (q, k, _), tau in zip(layers, taus):
        f = reference.accumulated_selection(q[:, 0].detach(), k[:, 0].detach(), D ** -0.5)
        for b in range(B):
            m = [(i + 1) - sum(min(f[b, i, j].item(), tau) for j in range(i + 1)) / tau
                 for i in range(N)]
            total += max(m)
    expected = total / (len(layers) * B)
    assert abs(results[0][0].item() - expected) <= 1e-9 * max(1.0, abs(expected))
    assert expected < N - 1, "the memory loss is trivial for these inputs"
    for i, (ours, ref) in enumerate(zip(results[0][1:], results[1][1:])):
        torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-9, msg=lambda m: f"grad {i}: {m}")
    assert any(g.abs().max() > 0 for g in results[0][1:])


def test_memory_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        selattn_ext.memory_loss([])
    with pytest.raises(ValueError, match=r"memories\[1\].*2-D"):
        selattn_ext.memory_loss([torch.zeros(2, 3), torch.zeros(2, 3, 1)])
    with pytest.raises(ValueError, match=r"memories\[1\].*batch size"):
        selattn_ext.memory_loss([torch.zeros(2, 3), torch.zeros(1, 3)])


def _op_samples(device):
    """(args without mem_tau) for the raw ops: GQA fp32, a transposed layout with selection
    views, and fp64 with explicit selection inputs."""
    B, Hq, Hkv, N, D = 2, 4, 2, 19, 32
    g = torch.Generator().manual_seed(40)

    def r(*shape, dtype=torch.float32):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * STD).to(dtype).to(device)

    q, k, v = r(B, Hq, N, D), r(B, Hkv, N, D), r(B, Hkv, N, D)
    qt, kt, vt = (r(B, N, h, D).transpose(1, 2) for h in (Hq, Hkv, Hkv))
    q64, k64, v64 = (r(B, h, N, D, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    return [(q, k, v, q[:, 1].clone(), k[:, 0].clone(), D ** -0.5),
            (qt, kt, vt, qt[:, 3], kt[:, 1], 0.3),
            (q64, k64, v64, r(B, N, D, dtype=torch.float64), r(B, N, D, dtype=torch.float64),
             D ** -0.5)]


@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize("mem_tau", [None, 0.8])
def test_opcheck_prefill_with_mem_tau(index, mem_tau, device):
    skip_if_unsupported(device, torch.float64 if index == 2 else torch.float32, 32)
    args = _op_samples(device)[index]
    fwd_args = tuple(a.detach().requires_grad_() if torch.is_tensor(a) else a for a in args)
    opcheck(torch.ops.selattn.prefill_fwd.default, fwd_args + (mem_tau,))

    out, lse, mem = torch.ops.selattn.prefill_fwd(*args, mem_tau)
    stats = lse.dtype
    assert mem.dtype == stats
    assert mem.shape == ((args[0].shape[0], args[0].shape[2]) if mem_tau else (0,))
    g = torch.Generator().manual_seed(41 + index)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    dmem = torch.randn(mem.shape, generator=g, dtype=torch.float64).to(mem) if mem_tau else None
    q, k, v, q_sel, k_sel, scale = args
    opcheck(torch.ops.selattn.prefill_bwd.default,
            (dout, q, k, v, q_sel, k_sel, out, lse, None, scale, dmem, mem_tau))


def test_raw_bwd_dmem_term_is_linear_and_zero_without_dmem(device):
    """prefill_bwd(dmem) - prefill_bwd(None) is the memory term alone and is linear in dmem;
    a mem_tau without dmem changes nothing."""
    q, k, v, q_sel, k_sel, scale = _op_samples(device)[2]  # fp64
    out, lse, mem = torch.ops.selattn.prefill_fwd(q, k, v, q_sel, k_sel, scale, 0.8)
    dout = torch.randn_like(out)
    base = torch.ops.selattn.prefill_bwd(dout, q, k, v, q_sel, k_sel, out, lse, None, scale)
    same = torch.ops.selattn.prefill_bwd(dout, q, k, v, q_sel, k_sel, out, lse, None, scale,
                                         None, 0.8)
    dmem = torch.randn_like(mem)
    one = torch.ops.selattn.prefill_bwd(dout, q, k, v, q_sel, k_sel, out, lse, None, scale,
                                        dmem, 0.8)
    two = torch.ops.selattn.prefill_bwd(dout, q, k, v, q_sel, k_sel, out, lse, None, scale,
                                        2 * dmem, 0.8)
    for name, b, s, o, t in zip(["dq", "dk", "dv", "dq_sel", "dk_sel"], base, same, one, two):
        assert torch.equal(b, s), name
        torch.testing.assert_close(t - b, 2 * (o - b), atol=1e-10, rtol=1e-9,
                                   msg=lambda m: f"{name}: {m}")
        if name in ("dq_sel", "dk_sel"):
            assert (o - b).abs().max() > 1e-6, f"{name}: the memory term is missing"
        else:  # the memory loss does not depend on q, k, v beyond the selection inputs
            assert torch.equal(o, b), name


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_mem_tau_rejected(tau, device):
    skip_if_unsupported(device, torch.float32, 32)
    q = torch.randn(1, 2, 5, 32, device=device)
    with pytest.raises(ValueError, match="mem_tau"):
        selattn_ext.attention(q, q, q, memory_tau=tau)
    with pytest.raises(ValueError, match="mem_tau"):
        torch.ops.selattn.prefill_fwd(q, q, q, q[:, 0], q[:, 0], 1.0, tau)
    with pytest.raises(ValueError, match="mem_tau"):  # the fake kernel (torch.compile) too
        qm = q.to("meta")
        torch.ops.selattn.prefill_fwd(qm, qm, qm, qm[:, 0], qm[:, 0], 1.0, tau)
    with pytest.raises(ValueError, match="memory_tau"):
        SelectiveSelfAttention(64, 2, memory_tau=tau)


def test_bad_dmem_rejected(device):
    q, k, v, q_sel, k_sel, scale = _op_samples(device)[0]
    out, lse, mem = torch.ops.selattn.prefill_fwd(q, k, v, q_sel, k_sel, scale, 1.0)
    common = (torch.randn_like(out), q, k, v, q_sel, k_sel, out, lse, None, scale)
    with pytest.raises(ValueError, match="dmem needs the mem_tau"):
        torch.ops.selattn.prefill_bwd(*common, torch.zeros_like(mem), None)
    with pytest.raises(ValueError, match="dmem must have shape"):
        torch.ops.selattn.prefill_bwd(*common, torch.zeros(2, 3, device=device), 1.0)
    with pytest.raises(TypeError, match="dmem must be"):
        torch.ops.selattn.prefill_bwd(*common, torch.zeros_like(mem).double(), 1.0)


def test_compile_fullgraph_with_memory(device):
    B, Hq, Hkv, N, D = 2, 4, 2, 21, 32
    leaves = [_leaf(B, Hq, N, D, device=device, seed=50).float(),
              _leaf(B, Hkv, N, D, device=device, seed=51).float(),
              _leaf(B, Hkv, N, D, device=device, seed=52).float()]
    leaves = [t.detach().requires_grad_() for t in leaves]

    def fn(q, k, v):
        out, mem = selattn_ext.attention(q, k, v, memory_tau=1.0)
        return out, mem, out.square().sum() + 0.1 * selattn_ext.memory_loss([mem, mem * 0.5])

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        out, mem, loss = f(*leaves)
        results.append([out, mem, loss] + list(torch.autograd.grad(loss, leaves)))
    for name, a, b in zip(["out", "M", "loss", "dq", "dk", "dv"], *results):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_module_flag_stores_layer_memory(device):
    torch.manual_seed(7)
    E, H, Hkv, N, tau = 64, 4, 2, 33, 1.0
    layer = SelectiveSelfAttention(E, H, Hkv, memory_tau=tau, sel_head=1).double().to(device)
    with torch.no_grad():  # sharper logits, so F (and the memory) is non-trivial
        layer.qkv.weight.mul_(4.0)
    plain = SelectiveSelfAttention(E, H, Hkv, sel_head=1).double().to(device)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, N, E, dtype=torch.float64, device=device)
    assert layer.last_memory is None
    y = layer(x)
    torch.testing.assert_close(y, plain(x), atol=1e-12, rtol=1e-12)
    assert plain.last_memory is None

    mem = layer.last_memory
    q, k, v = layer._project(x, torch.arange(N, device=device))
    _, ref = reference.attention(q, k, v, sel_head=1, memory_tau=tau)
    torch.testing.assert_close(mem, ref, atol=1e-9, rtol=1e-9)
    assert mem.min() < N - 5, "no token is masked; the memory is trivial"
    (gw,) = torch.autograd.grad(selattn_ext.memory_loss([mem]), [layer.qkv.weight])
    assert gw.abs().max() > 0

    cache = selattn_ext.SelectiveKVCache(2, Hkv, E // H, N, max_chunk=4, dtype=torch.float64,
                                         device=device)
    with torch.no_grad():
        layer(x[:, :4], cache)
    assert layer.last_memory is None


def test_module_flag_rejects_non_selective():
    with pytest.raises(ValueError, match="memory_tau needs selective=True"):
        SelectiveSelfAttention(64, 2, selective=False, memory_tau=1.0)
    assert math.isclose(SelectiveSelfAttention(64, 2, memory_tau=2).memory_tau, 2)


def test_raw_wrapper_keeps_two_outputs_without_mem_tau(device):
    """selattn_ext.ops.prefill_fwd returns (out, lse) as before unless mem_tau is given."""
    q, k, v, q_sel, k_sel, scale = _op_samples(device)[0]
    out, lse = selattn_ext.ops.prefill_fwd(q, k, v, q_sel, k_sel, scale)
    out3, lse3, mem = selattn_ext.ops.prefill_fwd(q, k, v, q_sel, k_sel, scale, 1.0)
    assert torch.equal(out, out3) and torch.equal(lse, lse3)
    assert mem.shape == (q.shape[0], q.shape[2])
