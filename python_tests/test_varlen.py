"""selattn_ext.attention_varlen (DESIGN §1.1): a packed batch is exactly its sequences run
alone. Checked against selattn_ext.attention per sequence (fp64: tight) and against the fp64
reference per sequence with the FlashAttention rule (low precision), forward and backward;
fp64 gradcheck; random length mixes with 0, 1 and multi-block sequences; bad cu_seqlens."""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence

import pytest
import torch
from torch.library import opcheck

import selattn_ext
from selattn_ext import reference
from prefill_cases import STD, assert_fa_close, assert_f_matters



def cu_of(lengths: Sequence[int], device="cpu") -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def make_packed(lengths, hq, hkv, d, dtype, seed, explicit_sel=False, device="cpu"):
    """Packed leaves. q is stored as a slice of a wider fused projection (row stride > Hq*D),
    so the strided path is exercised; k/v are dense (total, H, D)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def rnd(*shape, std=STD):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device)

    leaves = {"qkv": rnd(total, hq + 1, d), "k": rnd(total, hkv, d),
              "v": rnd(total, hkv, d, std=1.0)}
    if explicit_sel:
        leaves.update(q_sel=rnd(total, d), k_sel=rnd(total, d))
    return leaves


def inputs_of(leaves, hq):
    q = leaves["qkv"][:, :hq]
    return q, leaves["k"], leaves["v"], leaves.get("q_sel"), leaves.get("k_sel")


def cotangents(total, hq, d, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed + 7)
    dout = torch.randn(total, hq, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    dlse = torch.randn(hq, total, generator=g, dtype=torch.float64)
    return dout, dlse.to(torch.float64 if dtype == torch.float64 else torch.float32).to(device)


def run_varlen(leaves, lengths, hq, dout, dlse, sel_head=0, grads=True):
    leaves = {n: t.detach().clone().requires_grad_(grads) for n, t in leaves.items()}
    q, k, v, q_sel, k_sel = inputs_of(leaves, hq)
    out, lse = selattn_ext.attention_varlen(q, k, v, cu_of(lengths, q.device),
                                            max(lengths, default=0), sel_head=sel_head,
                                            q_sel=q_sel, k_sel=k_sel, return_lse=True)
    res = {"out": out.detach(), "lse": lse.detach()}
    if grads:
        loss = (out * dout).sum() + (lse * dlse).sum()
        gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        res.update({"d" + n: gr for n, gr in zip(leaves, gs)})
    return res


def run_per_sequence(fn, leaves, lengths, hq, dout, dlse, sel_head=0, grads=True):
    """``fn`` (selattn_ext.attention or reference.attention) on each sequence alone, results
    re-packed; zero-length sequences contribute nothing."""
    leaves = {n: t.detach().clone().requires_grad_(grads) for n, t in leaves.items()}
    q, k, v, q_sel, k_sel = inputs_of(leaves, hq)
    outs, lses = [], []
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        start += n
        if n == 0:
            continue
        kw = {}
        if q_sel is not None:
            kw = dict(q_sel=q_sel[sl][None], k_sel=k_sel[sl][None])
        out, lse = fn(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                      v[sl].transpose(0, 1)[None], sel_head=sel_head, return_lse=True, **kw)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    total = sum(lengths)
    out = torch.cat(outs) if outs else q.new_zeros(0, hq, q.shape[-1])
    lse = torch.cat(lses, dim=1) if lses else dlse.new_zeros(hq, 0)
    assert out.shape[0] == total
    res = {"out": out.detach(), "lse": lse.detach()}
    if grads:
        loss = (out * dout).sum() + (lse * dlse.to(lse.dtype)).sum()
        if not loss.requires_grad:  # no tokens at all: every gradient is empty
            gs = [torch.zeros_like(t) for t in leaves.values()]
        else:
            gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        res.update({"d" + n: gr for n, gr in zip(leaves, gs)})
    return res


def fill_none(res: Dict[str, Optional[torch.Tensor]], like: Dict[str, torch.Tensor]):
    # allow_unused gives None for the unused head of the qkv slab in an empty batch.
    return {n: (torch.zeros_like(like[n]) if t is None else t) for n, t in res.items()}


def check(lengths, hq=4, hkv=2, d=32, dtype=torch.float64, sel_head=0, explicit_sel=False,
          seed=0, grads=True, device="cpu"):
    leaves = make_packed(lengths, hq, hkv, d, dtype, seed, explicit_sel, device)
    total = sum(lengths)
    dout, dlse = cotangents(total, hq, d, dtype, seed, device)
    ours = run_varlen(leaves, lengths, hq, dout, dlse, sel_head, grads)
    if dtype == torch.float64:
        # fp64: the packed op equals the dense op on each sequence alone, tightly.
        alone = run_per_sequence(selattn_ext.attention, leaves, lengths, hq, dout, dlse,
                                 sel_head, grads)
        for name in ours:
            a = fill_none(alone, leaves)[name] if alone[name] is None else alone[name]
            torch.testing.assert_close(ours[name], a, atol=1e-10, rtol=1e-10,
                                       msg=lambda m: f"{name}: {m}")
    low = run_per_sequence(reference.attention, leaves, lengths, hq, dout, dlse, sel_head, grads)
    oracle = run_per_sequence(reference.attention, {n: t.double() for n, t in leaves.items()},
                              lengths, hq, dout.double(), dlse.double(), sel_head, grads)
    low, oracle = fill_none(low, leaves), fill_none(oracle, leaves)
    assert ours["out"].dtype == dtype and ours["out"].shape == (total, hq, d)
    assert ours["lse"].shape == (hq, total) and ours["lse"].is_contiguous()
    for name in ours:
        assert_fa_close(name, ours[name], low[name], oracle[name],
                        factor=3.0 if name.startswith("d") else 2.0)


# 300 and 129 span several 128-row query blocks (and key blocks); 0 and 1 are the edge cases.
MIXES = [
    [5],
    [0, 1, 7, 0],
    [1, 1, 1],
    [300, 0, 129, 1, 37],
    [0],
    [],
]


@pytest.mark.parametrize("lengths", MIXES, ids=lambda l: "-".join(map(str, l)) or "empty")
def test_fp64_matches_attention_per_sequence(lengths):
    check(lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda t: str(t)[6:])
def test_low_precision_fa_rule(dtype):
    check([300, 0, 129, 1, 37], dtype=dtype, seed=1)


@pytest.mark.parametrize("seed", range(4))
def test_random_length_mixes(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 2, rng.randint(3, 64), rng.randint(128, 400)])
               for _ in range(rng.randint(1, 6))]
    hq, hkv = rng.choice([(1, 1), (4, 2), (6, 1)])
    dtype = rng.choice([torch.float64, torch.float32, torch.bfloat16])
    check(lengths, hq=hq, hkv=hkv, d=rng.choice([8, 64]), dtype=dtype,
          sel_head=rng.choice([0, -1]), seed=seed)


def test_many_short_sequences_and_long_ones():
    """Short sequences run one per thread, long ones spread over the threads: both at once."""
    rng = random.Random(5)
    lengths = [rng.randint(0, 40) for _ in range(60)] + [257, 256, 3]
    rng.shuffle(lengths)
    check(lengths, hq=2, hkv=1, d=16, seed=5)
    check(lengths, hq=2, hkv=1, d=16, dtype=torch.float32, seed=6)


def test_explicit_selection_inputs_and_sel_head():
    check([40, 3, 0, 90], hq=4, hkv=4, d=16, explicit_sel=True, seed=3)
    check([40, 3, 0, 90], hq=4, hkv=2, d=16, sel_head=3, seed=4)


def test_f_is_nontrivial_in_these_cases():
    leaves = make_packed([300], 4, 2, 32, torch.float64, 0)
    q, k, *_ = inputs_of(leaves, 4)
    assert_f_matters(q[:, 0][None], k[:, 0][None], 32 ** -0.5)


def test_no_leak_between_sequences():
    """Changing one sequence's tokens leaves the other sequences' outputs bit-identical."""
    lengths = [50, 60, 70]
    leaves = make_packed(lengths, 2, 1, 16, torch.float32, 5)
    q, k, v, *_ = inputs_of(leaves, 2)
    cu = cu_of(lengths)
    out = selattn_ext.attention_varlen(q, k, v, cu, 70)
    k2, v2 = k.clone(), v.clone()
    k2[50:110] += 1.0
    v2[50:110] -= 2.0
    out2 = selattn_ext.attention_varlen(q, k2, v2, cu, 70)
    assert torch.equal(out[:50], out2[:50]) and torch.equal(out[110:], out2[110:])
    assert not torch.equal(out[50:110], out2[50:110])


def test_gradcheck_fp64():
    lengths = [3, 0, 5, 1]
    leaves = make_packed(lengths, 2, 1, 8, torch.float64, 11, explicit_sel=True)
    cu = cu_of(lengths)

    def fn(qkv, k, v, q_sel, k_sel):
        out, lse = selattn_ext.attention_varlen(qkv[:, :2], k, v, cu, 5, q_sel=q_sel,
                                                k_sel=k_sel, return_lse=True)
        return out, lse

    args = [leaves[n].detach().requires_grad_() for n in ("qkv", "k", "v", "q_sel", "k_sel")]
    assert torch.autograd.gradcheck(fn, args)

    def fn_head(qkv, k, v):
        return selattn_ext.attention_varlen(qkv[:, :2], k, v, cu, 5, sel_head=1)

    assert torch.autograd.gradcheck(fn_head, args[:3])


def test_memory_tau_matches_attention_per_sequence():
    lengths = [20, 0, 1, 33]
    tau = 1.5
    leaves = make_packed(lengths, 2, 1, 16, torch.float64, 2)
    q, k, v, *_ = inputs_of({n: t.requires_grad_() for n, t in leaves.items()}, 2)
    out, mem = selattn_ext.attention_varlen(q, k, v, cu_of(lengths), 33, memory_tau=tau)
    assert mem.shape == (54,) and mem.dtype == torch.float64
    expected, start = [], 0
    for n in lengths:
        if n:
            sl = slice(start, start + n)
            _, m = reference.attention(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                       v[sl].transpose(0, 1)[None], memory_tau=tau)
            expected.append(m[0])
        start += n
    expected = torch.cat(expected)
    torch.testing.assert_close(mem, expected, atol=1e-10, rtol=1e-10)
    g1 = torch.autograd.grad(mem.square().sum(), [leaves["qkv"], leaves["k"]])
    g2 = torch.autograd.grad(expected.square().sum(), [leaves["qkv"], leaves["k"]])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _qkv(total=6, hq=2, hkv=1, d=8):
    return (torch.randn(total, hq, d), torch.randn(total, hkv, d), torch.randn(total, hkv, d))


@pytest.mark.parametrize("cu, max_seqlen, exc, match", [
    (torch.tensor([0, 2, 6], dtype=torch.int64), 4, TypeError, "cu_seqlens must be int32"),
    (torch.tensor([0.0, 2, 6]), 4, TypeError, "cu_seqlens must be int32"),
    (torch.tensor([1, 2, 6], dtype=torch.int32), 4, ValueError, "must start at 0"),
    (torch.tensor([0, 4, 2, 6], dtype=torch.int32), 4, ValueError, "non-decreasing"),
    (torch.tensor([0, 2, 5], dtype=torch.int32), 4, ValueError, r"cu_seqlens\[-1\] = 5"),
    (torch.tensor([0, 2, 7], dtype=torch.int32), 5, ValueError, r"cu_seqlens\[-1\] = 7"),
    (torch.tensor([0, 2, 6], dtype=torch.int32), 3, ValueError, "max_seqlen = 3 is smaller"),
    (torch.tensor([0, 2, 6], dtype=torch.int32), -1, ValueError, "max_seqlen must be >= 0"),
    (torch.tensor([[0, 2, 6]], dtype=torch.int32), 4, ValueError, "cu_seqlens must be 1-D"),
    (torch.zeros(0, dtype=torch.int32), 4, ValueError, "cu_seqlens must be 1-D"),
], ids=["int64", "float", "start", "decreasing", "last-short", "last-long", "max_seqlen",
        "max_seqlen-neg", "2d", "empty"])
def test_bad_cu_seqlens(cu, max_seqlen, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        selattn_ext.attention_varlen(q, k, v, cu, max_seqlen)


def test_bad_cu_seqlens_device():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="cu_seqlens must be on the device of q"):
        selattn_ext.ops.prefill_varlen_fwd(q, k, v, q[:, 0], k[:, 0],
                                           cu_of([2, 4], "meta"), 4, 1.0)


def test_bad_shapes_and_types():
    q, k, v = _qkv()
    cu = cu_of([2, 4])
    with pytest.raises(ValueError, match="q must be 3-D"):
        selattn_ext.attention_varlen(q[None], k, v, cu, 4)
    with pytest.raises(ValueError, match=r"k must have shape \(total, Hkv, D\)"):
        selattn_ext.attention_varlen(q, k[:5], v, cu, 4)
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        selattn_ext.attention_varlen(q, torch.randn(6, 3, 8), torch.randn(6, 3, 8), cu, 4)
    with pytest.raises(TypeError, match="max_seqlen must be an int"):
        selattn_ext.attention_varlen(q, k, v, cu, 4.0)
    with pytest.raises(TypeError, match="must have the dtype of q"):
        selattn_ext.attention_varlen(q, k.double(), v, cu, 4)


def test_fake_cuda_tensors_get_the_varlen_shapes():
    """What torch.compile sees on the GPU: the fake kernels accept CUDA tensors (the CUDA
    kernels exist) and give FlashAttention's layouts. Checked without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        try:
            q = torch.empty(6, 2, 8, device="cuda")
            k = torch.empty(6, 1, 8, device="cuda")
            cu = torch.zeros(3, dtype=torch.int32, device="cuda")
        except (RuntimeError, AssertionError) as e:  # pragma: no cover (no fake CUDA tensors)
            pytest.skip(f"fake CUDA tensors unavailable: {e}")
        out, lse, mem = torch.ops.selattn.prefill_varlen_fwd(q, k, k, q[:, 0], k[:, 0], cu, 4,
                                                              1.0, 0.5)
        assert out.shape == (6, 2, 8) and out.device.type == "cuda"
        assert lse.shape == (2, 6) and mem.shape == (6,)
        grads = torch.ops.selattn.prefill_varlen_bwd(q, q, k, k, q[:, 0], k[:, 0], cu, 4, out,
                                                     lse, None, 1.0)
        assert [g.shape for g in grads] == [q.shape, k.shape, k.shape, (6, 8), (6, 8)]


# ---------------------------------------------------------------------------------------------
# CUDA (pytest -m cuda on a GPU; the same kernels run on the CPU in test_cuda_emulation.py)

def needs_gpu(fn):
    """The ``cuda`` marker (``pytest -m cuda`` selects the GPU tests) and a skip without one."""
    return pytest.mark.cuda(
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")(fn))


def _cuda_path(monkeypatch, path):
    """Pins the CUDA launcher's path (read at every call, see csrc/cuda/prefill/launch.cu)."""
    if path == "simt":
        monkeypatch.setenv("SELATTN_CUDA_FORCE_SIMT", "1")
        monkeypatch.delenv("SELATTN_CUDA_TC_BWD", raising=False)
    else:
        monkeypatch.delenv("SELATTN_CUDA_FORCE_SIMT", raising=False)
        monkeypatch.setenv("SELATTN_CUDA_TC_BWD", "1")


@pytest.mark.parametrize("lengths", MIXES, ids=lambda l: "-".join(map(str, l)) or "empty")
@needs_gpu
def test_cuda_fp64_matches_attention_per_sequence(lengths):
    check(lengths, device="cuda")


@pytest.mark.parametrize("path", ["simt", "tc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda t: str(t)[6:])
@needs_gpu
def test_cuda_low_precision_fa_rule(dtype, path, monkeypatch):
    if path == "tc" and dtype == torch.float32:
        pytest.skip("the tensor-core kernels take bf16/fp16")
    _cuda_path(monkeypatch, path)
    # d = 64: a tensor-core head dim; 300 and 129 span several 64-row tiles.
    check([300, 0, 129, 1, 37], d=64, dtype=dtype, seed=1, device="cuda")
    check([70, 3, 0, 90], hq=4, hkv=2, d=64, dtype=dtype, sel_head=3, explicit_sel=True,
          seed=2, device="cuda")


@needs_gpu
def test_cuda_random_length_mixes():
    for seed in range(4):
        rng = random.Random(100 + seed)
        lengths = [rng.choice([0, 1, 2, rng.randint(3, 64), rng.randint(128, 400)])
                   for _ in range(rng.randint(1, 8))]
        check(lengths, hq=4, hkv=2, d=rng.choice([8, 64, 129]), dtype=torch.float64,
              sel_head=rng.choice([0, -1]), seed=seed, device="cuda")


@needs_gpu
def test_cuda_equals_cpu_and_memory_tau():
    lengths = [20, 0, 1, 33, 130]
    leaves = make_packed(lengths, 2, 1, 16, torch.float64, 2)
    q, k, v, *_ = inputs_of(leaves, 2)
    cu = cu_of(lengths)
    res = [selattn_ext.attention_varlen(*(t.to(dev) for t in (q, k, v)), cu.to(dev), 130,
                                        memory_tau=1.5, return_lse=True)
           for dev in ("cpu", "cuda")]
    for a, b in zip(*res):
        torch.testing.assert_close(b.cpu(), a, atol=1e-10, rtol=1e-10)


@needs_gpu
def test_cuda_bad_cu_seqlens():
    q, k, v = (t.cuda() for t in _qkv())
    with pytest.raises(ValueError, match="non-decreasing"):
        selattn_ext.attention_varlen(q, k, v, torch.tensor([0, 4, 2, 6], dtype=torch.int32,
                                                           device="cuda"), 4)
    with pytest.raises(ValueError, match="cu_seqlens must be on the device of q"):
        selattn_ext.attention_varlen(q, k, v, cu_of([2, 4]), 4)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile


def test_opcheck():
    lengths = [5, 0, 9, 1]
    leaves = make_packed(lengths, 4, 2, 16, torch.float32, 8, explicit_sel=True)
    q, k, v, q_sel, k_sel = inputs_of({n: t.requires_grad_() for n, t in leaves.items()}, 4)
    cu = cu_of(lengths)
    for mem_tau in (None, 2.0):
        opcheck(torch.ops.selattn.prefill_varlen_fwd.default,
                (q, k, v, q_sel, k_sel, cu, 9, 0.25, mem_tau))
    with torch.no_grad():
        out, lse, mem = torch.ops.selattn.prefill_varlen_fwd(q, k, v, q_sel, k_sel, cu, 9,
                                                            0.25, 2.0)
    dout = torch.randn_like(out)
    dlse, dmem = torch.randn_like(lse), torch.randn_like(mem)
    args = [t.detach() for t in (dout, q, k, v, q_sel, k_sel)]
    opcheck(torch.ops.selattn.prefill_varlen_bwd.default,
            (*args, cu, 9, out, lse, dlse, 0.25, dmem, 2.0))
    opcheck(torch.ops.selattn.prefill_varlen_bwd.default,
            (*args, cu, 9, out, lse, None, 0.25))


def test_compile_fullgraph_matches_eager():
    lengths = [17, 0, 40, 1]
    leaves = make_packed(lengths, 4, 2, 16, torch.float32, 9)
    cu = cu_of(lengths)

    def fn(qkv, k, v):
        out, lse = selattn_ext.attention_varlen(qkv[:, :4], k, v, cu, 40, return_lse=True)
        return (out.square().sum() + lse.sum())

    args = [leaves[n].detach().requires_grad_() for n in ("qkv", "k", "v")]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    res = []
    for f in (fn, compiled):
        loss = f(*args)
        res.append([loss, *torch.autograd.grad(loss, args)])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_nn_module_packed_forward_equals_sequences_alone():
    """SelectiveSelfAttention(cu_seqlens=...): positions (RoPE) and BOS restart per sequence."""
    torch.manual_seed(0)
    attn = selattn_ext.nn.SelectiveSelfAttention(32, 4, 2).double()
    with torch.no_grad():
        attn.qkv.weight.mul_(4)  # logits large enough that F matters
    lengths = [7, 0, 1, 20]
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64, requires_grad=True)
    out = attn(x, cu_seqlens=cu_of(lengths), max_seqlen=20)
    alone, start = [], 0
    for n in lengths:
        if n:
            alone.append(attn(x[:, start:start + n]))
        start += n
    alone = torch.cat(alone, dim=1)
    torch.testing.assert_close(out, alone, atol=1e-10, rtol=1e-10)
    g1, = torch.autograd.grad(out.square().sum(), x)
    g2, = torch.autograd.grad(alone.square().sum(), x)
    torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="packed x must be"):
        attn(x.expand(2, -1, -1), cu_seqlens=cu_of(lengths))
