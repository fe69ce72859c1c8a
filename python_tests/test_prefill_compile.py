"""torch.compile(fullgraph=True) through the op (forward and backward equal eager), and
torch.library.opcheck on every op (schema, fake kernel, autograd registration,
aot_dispatch)."""

import pytest
import torch
from torch.library import opcheck

import selattn_ext
from prefill_cases import STD, skip_if_unsupported


def rand(*shape, dtype, device, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * STD).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


def loss_fn(q, k, v, q_sel, k_sel):
    out, lse = selattn_ext.attention(q, k, v, q_sel=q_sel, k_sel=k_sel, return_lse=True)
    out2 = selattn_ext.attention(q, k, v, sel_head=-1)  # the sel_head path, with default scale
    return out, lse, (out * out2).sum() + lse.square().sum()


# Inductor compiles C++ for the surrounding ops (~80 s on 2 cores, cold cache): marked slow.
@pytest.mark.parametrize("backend", ["aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(backend, device):
    dtype, B, Hq, Hkv, N, D = torch.float32, 2, 4, 2, 37, 32
    skip_if_unsupported(device, dtype, D)
    # (B, N, H, D) storage passed transposed, as after a fused projection.
    leaves = [rand(B, N, Hq, D, dtype=dtype, device=device, seed=1, requires_grad=True),
              rand(B, N, Hkv, D, dtype=dtype, device=device, seed=2, requires_grad=True),
              rand(B, N, Hkv, D, dtype=dtype, device=device, seed=3, requires_grad=True),
              rand(B, N, D, dtype=dtype, device=device, seed=4, requires_grad=True),
              rand(B, N, D, dtype=dtype, device=device, seed=5, requires_grad=True)]

    def fn(q, k, v, q_sel, k_sel):
        return loss_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), q_sel, k_sel)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    results = []
    for f in (fn, compiled):
        out, lse, loss = f(*leaves)
        results.append([out, lse, loss] + list(torch.autograd.grad(loss, leaves)))
    for name, a, b in zip(["out", "lse", "loss", "dq", "dk", "dv", "dq_sel", "dk_sel"], *results):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def fwd_samples(device):
    """(args, id) samples for selattn::prefill_fwd: plain GQA, transposed layout with q_sel a
    view of q, independent sliced selection inputs in fp64, and N = 1."""
    samples = []
    B, Hq, Hkv, N, D = 2, 4, 2, 19, 32
    q = rand(B, Hq, N, D, dtype=torch.float32, device=device, seed=1, requires_grad=True)
    k = rand(B, Hkv, N, D, dtype=torch.float32, device=device, seed=2, requires_grad=True)
    v = rand(B, Hkv, N, D, dtype=torch.float32, device=device, seed=3, requires_grad=True)
    samples.append(((q, k, v, q[:, 1].detach().clone().requires_grad_(),
                     k[:, 0].detach().clone().requires_grad_(), D ** -0.5), "contiguous"))

    qt = rand(B, N, Hq, D, dtype=torch.float32, device=device, seed=4).transpose(1, 2)
    kt = rand(B, N, Hkv, D, dtype=torch.float32, device=device, seed=5).transpose(1, 2)
    vt = rand(B, N, Hkv, D, dtype=torch.float32, device=device, seed=6).transpose(1, 2)
    qt, kt, vt = (t.requires_grad_() for t in (qt.detach(), kt.detach(), vt.detach()))
    samples.append(((qt, kt, vt, qt[:, 3], kt[:, 1], 0.3), "transposed-sel-view"))

    wide = rand(B, N, 3 * D, dtype=torch.float64, device=device, seed=7)
    q64, k64, v64 = (rand(B, Hq, N, D, dtype=torch.float64, device=device, seed=s,
                          requires_grad=True) for s in (8, 9, 10))
    k64, v64 = k64[:, :Hkv].detach().requires_grad_(), v64[:, :Hkv].detach().requires_grad_()
    samples.append(((q64, k64, v64, wide[..., :D].requires_grad_(),
                     wide[..., D:2 * D].requires_grad_(), D ** -0.5), "fp64-sliced-sel"))

    q1, k1, v1 = (rand(1, 2, 1, D, dtype=torch.float32, device=device, seed=s, requires_grad=True)
                  for s in (11, 12, 13))
    samples.append(((q1, k1, v1, q1[:, 0], k1[:, 0], 1.0), "N1"))
    return samples


SAMPLE_IDS = ["contiguous", "transposed-sel-view", "fp64-sliced-sel", "N1"]


def sample(name, device):
    skip_if_unsupported(device, torch.float64 if name.startswith("fp64") else torch.float32, 32)
    return dict((sid, args) for args, sid in fwd_samples(device))[name]


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_opcheck_prefill_fwd(name, device):
    args = sample(name, device)
    opcheck(torch.ops.selattn.prefill_fwd.default, args)


@pytest.mark.parametrize("name", SAMPLE_IDS)
@pytest.mark.parametrize("with_dlse", [True, False], ids=["dlse", "no-dlse"])
def test_opcheck_prefill_bwd(name, with_dlse, device):
    args = tuple(a.detach() if torch.is_tensor(a) else a for a in sample(name, device))
    q, k, v, q_sel, k_sel, scale = args
    out, lse, _ = torch.ops.selattn.prefill_fwd(*args)
    g = torch.Generator().manual_seed(20)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse) if with_dlse else None
    opcheck(torch.ops.selattn.prefill_bwd.default,
            (dout, q, k, v, q_sel, k_sel, out, lse, dlse, scale))
