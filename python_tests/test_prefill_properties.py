"""Properties of the fused prefill op that follow from DESIGN §1 without the reference:
plain causal attention when nothing is selected, BOS/previous/self always visible, causality,
and consistency under head splitting, GQA expansion, batching and sel_head <-> explicit inputs.
Also checks the reference itself (F's structure, and a naive loop implementation)."""

import pytest
import torch
import torch.nn.functional as F

import selattn_ext
from selattn_ext import reference
from prefill_cases import STD, skip_if_unsupported

# (atol, rtol) for comparing two computations of the same quantity by the op.
TIGHT = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}
DTYPES = [torch.float64, torch.float32]


def rand(*shape, dtype, device, std=STD, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device)


def qkv(B, Hq, Hkv, N, D, dtype, device, seed=0):
    return (rand(B, Hq, N, D, dtype=dtype, device=device, seed=seed),
            rand(B, Hkv, N, D, dtype=dtype, device=device, seed=seed + 1),
            rand(B, Hkv, N, D, dtype=dtype, device=device, seed=seed + 2, std=1.0))


def grads_of(fn, inputs, seed=7):
    """out, lse and the gradients of a random linear loss on both w.r.t. ``inputs``."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out, lse = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse)
    loss = (out * dout).sum() + (lse * dlse).sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return out.detach(), lse.detach(), [torch.zeros_like(x) if g is None else g
                                        for x, g in zip(inputs, grads)]


def close(a, b, dtype, msg=""):
    atol, rtol = TIGHT[dtype]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")


# ---------------------------------------------------------------------------------------------
# Nothing selected -> plain causal attention.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sel", ["head", "explicit"])
def test_equals_causal_sdpa_when_selection_logits_are_nonpositive(sel, dtype, device):
    B, Hq, Hkv, N, D, sh = 2, 4, 2, 37, 32, 3
    skip_if_unsupported(device, dtype, D)
    q, k, v = qkv(B, Hq, Hkv, N, D, dtype, device)
    if sel == "head":
        # q[sh] . k[sh // g] <= 0 termwise, so relu(A) = 0 and F = 0.
        q[:, sh] = -q[:, sh].abs()
        k[:, sh // (Hq // Hkv)] = k[:, sh // (Hq // Hkv)].abs()
        sel_in = []
        fused = lambda q, k, v: selattn_ext.attention(q, k, v, sel_head=sh, return_lse=True)
    else:
        sel_in = [-rand(B, N, D, dtype=dtype, device=device, seed=5).abs(),
                  rand(B, N, D, dtype=dtype, device=device, seed=6).abs()]
        fused = lambda q, k, v, qs, ks: selattn_ext.attention(q, k, v, q_sel=qs, k_sel=ks,
                                                               return_lse=True)

    def plain(q, k, v, *unused):
        kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        logits = (q @ kk.transpose(-1, -2)) * D ** -0.5
        lse = logits.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1),
                                 float("-inf")).logsumexp(-1)
        return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)

    out, lse, grads = grads_of(fused, [q, k, v] + sel_in)
    out_p, lse_p, grads_p = grads_of(plain, [q, k, v] + sel_in)
    close(out, out_p, dtype, "out")
    close(lse, lse_p, dtype, "lse")
    for name, a, b in zip("qkv", grads, grads_p):
        close(a, b, dtype, f"d{name}")
    if sel == "explicit":
        # relu is flat where A < 0: nothing reaches the selection inputs.
        assert torch.equal(grads[3], torch.zeros_like(grads[3]))
        assert torch.equal(grads[4], torch.zeros_like(grads[4]))


def test_selection_changes_the_output(device):
    """The converse, so the test above is not vacuous: positive selection logits make F large
    and the output moves far from plain causal attention."""
    B, H, N, D = 1, 2, 33, 32
    q, k, v = qkv(B, H, H, N, D, torch.float32, device)
    q_sel = rand(B, N, D, dtype=torch.float32, device=device, seed=9).abs()
    out = selattn_ext.attention(q, k, v, q_sel=q_sel, k_sel=q_sel.clone())
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - plain).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# BOS, the previous token and the token itself are never masked.

@pytest.mark.parametrize("N", [1, 2, 3, 9, 70])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_bos_previous_and_self_survive_huge_selection(N, dtype, device):
    """With q_sel = k_sel = a large positive vector, every S[k, j] (1 <= j < k) is ~1e3, so
    F[i, j] >= 1e3 for 1 <= j <= i - 2 and those keys get weight exp(-1e3) = 0. Row i then
    attends exactly to {0, i - 1, i} (F = 0 there): the expected output is computed here in
    fp64 from the rounded inputs, without the reference. N = 1 gives out = v[0]."""
    B, Hq, Hkv, D = 2, 2, 1, 32
    skip_if_unsupported(device, dtype, D)
    s = D ** -0.5
    q, k, v = qkv(B, Hq, Hkv, N, D, dtype, device)
    big = torch.full((B, N, D), 12.0, dtype=dtype, device=device)  # A = s * 144 * D ~ 815
    out, lse = selattn_ext.attention(q, k, v, q_sel=big, k_sel=big, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()

    qd, kd, vd = q.double().cpu(), k.double().cpu(), v.double().cpu()
    want = torch.empty(B, Hq, N, D, dtype=torch.float64)
    want_lse = torch.empty(B, Hq, N, dtype=torch.float64)
    for i in range(N):
        keys = sorted({0, max(i - 1, 0), i})
        logits = s * torch.einsum("bhd,bhjd->bhj", qd[:, :, i], kd[:, :, keys].expand(B, Hq, -1, D))
        want[:, :, i] = torch.einsum("bhj,bhjd->bhd", logits.softmax(-1),
                                     vd[:, :, keys].expand(B, Hq, -1, D))
        want_lse[:, :, i] = logits.logsumexp(-1)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double().cpu(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double().cpu(), want_lse, atol=tol, rtol=tol)
    if N == 1:
        assert torch.equal(out.cpu(), v.expand(B, Hq, N, D).cpu())

    leaves = [t.detach().requires_grad_() for t in (q, k, v, big)]
    o, l = selattn_ext.attention(*leaves[:3], q_sel=leaves[3], k_sel=leaves[3], return_lse=True)
    for g in torch.autograd.grad(o.sum() + l.sum(), leaves):
        assert torch.isfinite(g).all()


# ---------------------------------------------------------------------------------------------
# Causality.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sel", ["head", "explicit"])
def test_rows_do_not_depend_on_future_tokens(sel, dtype, device):
    """Changing every input at positions > t leaves out/lse rows <= t unchanged, and a loss on
    rows <= t has zero gradient at positions > t (for all five inputs). Cuts straddle likely
    block edges."""
    B, Hq, Hkv, N, D = 1, 4, 2, 70, 32
    skip_if_unsupported(device, dtype, D)
    q, k, v = qkv(B, Hq, Hkv, N, D, dtype, device)
    q_sel = rand(B, N, D, dtype=dtype, device=device, seed=3)
    k_sel = rand(B, N, D, dtype=dtype, device=device, seed=4)

    def run(q, k, v, qs, ks):
        if sel == "head":
            return selattn_ext.attention(q, k, v, sel_head=1, return_lse=True)
        return selattn_ext.attention(q, k, v, q_sel=qs, k_sel=ks, return_lse=True)

    out, lse = run(q, k, v, q_sel, k_sel)
    for t in (0, 1, 15, 31, 32, 63):
        new = []
        for i, x in enumerate((q, k, v, q_sel, k_sel)):
            y = x.clone()
            y[..., t + 1:, :] = 3 * rand(*y[..., t + 1:, :].shape, dtype=dtype, device=device,
                                         seed=100 + i)
            new.append(y)
        out2, lse2 = run(*new)
        close(out2[:, :, : t + 1], out[:, :, : t + 1], dtype, f"out rows <= {t}")
        close(lse2[:, :, : t + 1], lse[:, :, : t + 1], dtype, f"lse rows <= {t}")
        assert (out2[:, :, t + 1:] - out[:, :, t + 1:]).abs().max() > 1e-3  # the change is real

        leaves = [x.detach().requires_grad_() for x in (q, k, v, q_sel, k_sel)]
        o, l = run(*leaves)
        loss = o[:, :, : t + 1].sum() + l[:, :, : t + 1].sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for name, g in zip(["q", "k", "v", "q_sel", "k_sel"], grads):
            if g is None:
                continue
            assert torch.equal(g[..., t + 1:, :], torch.zeros_like(g[..., t + 1:, :])), \
                f"d{name} nonzero after position {t}"


# ---------------------------------------------------------------------------------------------
# Consistency under regrouping: heads, kv groups, batch, sel_head vs explicit inputs.

@pytest.mark.parametrize("dtype", DTYPES)
def test_head_groups_computed_separately_agree(dtype, device):
    """Tensor-parallel sharding: with explicit q_sel/k_sel, each kv group computed on its own
    gives the same out/lse, and d(q_sel), d(k_sel) are the sums of the per-group ones."""
    B, Hq, Hkv, N, D = 2, 6, 2, 45, 32
    skip_if_unsupported(device, dtype, D)
    g = Hq // Hkv
    q, k, v = qkv(B, Hq, Hkv, N, D, dtype, device)
    q_sel = rand(B, N, D, dtype=dtype, device=device, seed=3)
    k_sel = rand(B, N, D, dtype=dtype, device=device, seed=4)
    fn = lambda q, k, v, qs, ks: selattn_ext.attention(q, k, v, q_sel=qs, k_sel=ks,
                                                        return_lse=True)
    out, lse, grads = grads_of(fn, [q, k, v, q_sel, k_sel])
    dq_sel_sum = torch.zeros_like(q_sel)
    dk_sel_sum = torch.zeros_like(k_sel)
    for j in range(Hkv):
        hs = slice(j * g, (j + 1) * g)
        # Same random loss restricted to the group: regenerate it with the same seed and slice.
        inputs = [t.detach().requires_grad_() for t in (q[:, hs], k[:, j:j + 1], v[:, j:j + 1],
                                                        q_sel, k_sel)]
        o, l = fn(*inputs)
        gen = torch.Generator().manual_seed(7)
        dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)[:, hs]
        dlse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse)[:, hs]
        gq, gk, gv, gqs, gks = torch.autograd.grad((o * dout).sum() + (l * dlse).sum(), inputs)
        close(o.detach(), out[:, hs], dtype, f"out group {j}")
        close(l.detach(), lse[:, hs], dtype, f"lse group {j}")
        close(gq, grads[0][:, hs], dtype, f"dq group {j}")
        close(gk, grads[1][:, j:j + 1], dtype, f"dk group {j}")
        close(gv, grads[2][:, j:j + 1], dtype, f"dv group {j}")
        dq_sel_sum += gqs
        dk_sel_sum += gks
    close(dq_sel_sum, grads[3], dtype, "dq_sel")
    close(dk_sel_sum, grads[4], dtype, "dk_sel")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sel_head", [0, 4, -1, -6])
def test_sel_head_equals_explicit_copies(sel_head, dtype, device):
    """sel_head=h is the same as passing copies of q[:, h] and k[:, h // g]; the gradient of q
    (k) is the explicit path's plus d(q_sel) (d(k_sel)) added into that head."""
    B, Hq, Hkv, N, D = 2, 6, 2, 29, 32
    skip_if_unsupported(device, dtype, D)
    sh = sel_head % Hq
    kvh = sh // (Hq // Hkv)
    q, k, v = qkv(B, Hq, Hkv, N, D, dtype, device)
    out, lse, (dq, dk, dv) = grads_of(
        lambda q, k, v: selattn_ext.attention(q, k, v, sel_head=sel_head, return_lse=True),
        [q, k, v])
    out_e, lse_e, (dq_e, dk_e, dv_e, dqs, dks) = grads_of(
        lambda q, k, v, qs, ks: selattn_ext.attention(q, k, v, q_sel=qs, k_sel=ks,
                                                       return_lse=True),
        [q, k, v, q[:, sh].clone(), k[:, kvh].clone()])
    close(out, out_e, dtype, "out")
    close(lse, lse_e, dtype, "lse")
    dq_e[:, sh] += dqs
    dk_e[:, kvh] += dks
    close(dq, dq_e, dtype, "dq")
    close(dk, dk_e, dtype, "dk")
    close(dv, dv_e, dtype, "dv")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_equals_repeated_kv_heads(dtype, device):
    B, Hq, Hkv, N, D = 1, 8, 2, 33, 32
    skip_if_unsupported(device, dtype, D)
    g = Hq // Hkv
    q, k, v = qkv(B, Hq, Hkv, N, D, dtype, device)
    out, lse, (dq, dk, dv) = grads_of(
        lambda q, k, v: selattn_ext.attention(q, k, v, sel_head=5, return_lse=True), [q, k, v])
    out_r, lse_r, (dq_r, dk_r, dv_r) = grads_of(
        lambda q, k, v: selattn_ext.attention(q, k.repeat_interleave(g, 1),
                                              v.repeat_interleave(g, 1), sel_head=5,
                                              return_lse=True), [q, k, v])
    close(out, out_r, dtype, "out")
    close(lse, lse_r, dtype, "lse")
    close(dq, dq_r, dtype, "dq")
    close(dk, dk_r, dtype, "dk")
    close(dv, dv_r, dtype, "dv")


def test_batch_elements_are_independent(device):
    dtype = torch.float32
    B, Hq, Hkv, N, D = 3, 4, 1, 40, 32
    q, k, v = qkv(B, Hq, Hkv, N, D, dtype, device)
    out, lse = selattn_ext.attention(q, k, v, sel_head=2, return_lse=True)
    for b in range(B):
        o, l = selattn_ext.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], sel_head=2,
                                     return_lse=True)
        close(o, out[b:b + 1], dtype, f"out batch {b}")
        close(l, lse[b:b + 1], dtype, f"lse batch {b}")


@pytest.mark.parametrize("scale", [0.11, 0.5])
def test_explicit_scale_matches_reference(scale, device):
    """The grid uses the default scale; a different scale must reach both the attention and
    the selection logits (fp64, so the bound is tight)."""
    B, Hq, Hkv, N, D = 1, 2, 1, 50, 32
    skip_if_unsupported(device, torch.float64, D)
    q, k, v = qkv(B, Hq, Hkv, N, D, torch.float64, device)
    out, lse, grads = grads_of(
        lambda q, k, v: selattn_ext.attention(q, k, v, scale=scale, sel_head=1, return_lse=True),
        [q, k, v])
    out_r, lse_r, grads_r = grads_of(
        lambda q, k, v: reference.attention(q, k, v, scale=scale, sel_head=1, return_lse=True),
        [q, k, v])
    close(out, out_r, torch.float64, "out")
    close(lse, lse_r, torch.float64, "lse")
    for n, a, b in zip("qkv", grads, grads_r):
        close(a, b, torch.float64, f"d{n}")
    default = selattn_ext.attention(q, k, v, sel_head=1)
    close(default, selattn_ext.attention(q, k, v, sel_head=1, scale=D ** -0.5), torch.float64,
          "default scale")
    assert (default - out).abs().max() > 1e-3


def test_inputs_are_not_modified_and_forward_is_deterministic(device):
    dtype = torch.float32
    B, Hq, Hkv, N, D = 2, 4, 2, 40, 32
    q, k, v = qkv(B, Hq, Hkv, N, D, dtype, device)
    q_sel = rand(B, N, D, dtype=dtype, device=device, seed=3)
    k_sel = rand(B, N, D, dtype=dtype, device=device, seed=4)
    before = [t.clone() for t in (q, k, v, q_sel, k_sel)]
    leaves = [t.requires_grad_() for t in (q, k, v, q_sel, k_sel)]
    o1, l1 = selattn_ext.attention(*leaves[:3], q_sel=leaves[3], k_sel=leaves[4], return_lse=True)
    (o1.sum() + l1.sum()).backward()
    o2, l2 = selattn_ext.attention(*leaves[:3], q_sel=leaves[3], k_sel=leaves[4], return_lse=True)
    for a, b in zip(before, leaves):
        assert torch.equal(a, b.detach())
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


EMPTY_SHAPES = [(0, 2, 5, 8), (1, 2, 0, 8)]


def empty_inputs(shape, device):
    q = torch.randn(shape, device=device, requires_grad=True)
    kv = torch.randn(shape[0], 1, shape[2], shape[3], device=device, requires_grad=True)
    return q, kv


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_inputs_forward(shape, device):
    q, kv = empty_inputs(shape, device)
    out, lse = selattn_ext.attention(q, kv, kv, return_lse=True)
    assert out.shape == shape and lse.shape == shape[:3]


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_inputs_backward(shape, device):
    # The gradient of .sum() on an empty output is an all-zero-stride tensor: it must pass.
    q, kv = empty_inputs(shape, device)
    out, lse = selattn_ext.attention(q, kv, kv, return_lse=True)
    (out.sum() + lse.sum()).backward()
    assert q.grad.shape == shape and kv.grad.shape == kv.shape


# ---------------------------------------------------------------------------------------------
# The oracle itself.

def naive_prefill(q, k, v, q_sel, k_sel, scale):
    """DESIGN §1 with explicit loops, in fp64 (small N only)."""
    B, Hq, N, D = q.shape
    g = Hq // k.shape[1]
    out = torch.zeros(B, Hq, N, D, dtype=torch.float64)
    lse = torch.zeros(B, Hq, N, dtype=torch.float64)
    for b in range(B):
        S = torch.zeros(N, N, dtype=torch.float64)
        for i in range(N):
            for j in range(1, i):
                S[i, j] = max(0.0, scale * float(q_sel[b, i] @ k_sel[b, j]))
        for h in range(Hq):
            for i in range(N):
                logits = torch.tensor([scale * float(q[b, h, i] @ k[b, h // g, j])
                                       - sum(float(S[m, j]) for m in range(j + 1, i))
                                       for j in range(i + 1)], dtype=torch.float64)
                w = torch.softmax(logits, 0)
                out[b, h, i] = w @ v[b, h // g, : i + 1]
                lse[b, h, i] = torch.logsumexp(logits, 0)
    return out, lse


def test_reference_matches_naive_loops():
    B, Hq, Hkv, N, D = 2, 4, 2, 9, 5
    q, k, v = qkv(B, Hq, Hkv, N, D, torch.float64, "cpu")
    out, lse = reference.attention(q, k, v, sel_head=3, return_lse=True)
    want, want_lse = naive_prefill(q, k, v, q[:, 3], k[:, 1], D ** -0.5)
    close(out, want, torch.float64, "out")
    close(lse, want_lse, torch.float64, "lse")


def test_reference_F_is_nonnegative_monotone_and_spares_bos_previous_self():
    B, N, D = 3, 60, 16
    q_sel = rand(B, N, D, dtype=torch.float64, device="cpu", seed=1)
    k_sel = rand(B, N, D, dtype=torch.float64, device="cpu", seed=2)
    f = reference.accumulated_selection(q_sel, k_sel, D ** -0.5)
    assert (f >= 0).all()
    assert (f[:, 1:] >= f[:, :-1]).all(), "F must be non-decreasing in i"
    assert (f[:, :, 0] == 0).all()
    idx = torch.arange(N)
    assert (f[:, idx, idx] == 0).all()
    assert (f[:, idx[1:], idx[:-1]] == 0).all()
    assert (f.triu(1) == 0).all()
    assert (f > 1).any()
