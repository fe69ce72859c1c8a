"""Bad input to the prefill op raises a Python exception that names the argument (DESIGN §5).
The checks live in csrc/ops.cpp (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE ->
TypeError) and, for the sel_head / q_sel pairing, in selattn_ext/attention.py."""

import math

import pytest
import torch

import selattn_ext
from selattn_ext import reference

from prefill_cases import skip_if_unsupported

B, HQ, HKV, N, D = 2, 4, 2, 5, 8


def good(device, dtype=torch.float32):
    q = torch.randn(B, HQ, N, D, dtype=dtype, device=device)
    k = torch.randn(B, HKV, N, D, dtype=dtype, device=device)
    v = torch.randn(B, HKV, N, D, dtype=dtype, device=device)
    return q, k, v


def sel(device, dtype=torch.float32, n=N, d=D, b=B):
    return torch.randn(b, n, d, dtype=dtype, device=device)


def call(device, *, q=None, k=None, v=None, **kw):
    gq, gk, gv = good(device)
    return selattn_ext.attention(gq if q is None else q, gk if k is None else k,
                                 gv if v is None else v, **kw)


def last_dim_strided(shape, device):
    # Same shape, but the last dimension has stride != 1.
    return torch.randn(*shape[:-2], shape[-1], shape[-2], device=device).transpose(-1, -2)


# (id, function of device, exception type, regex the message must match)
BAD_ATTENTION_CALLS = [
    ("q-3d", lambda d: call(d, q=torch.randn(B, N, D, device=d)), ValueError, r"\bq\b.*4-D"),
    ("k-5d", lambda d: call(d, k=torch.randn(B, HKV, N, D, 1, device=d)), ValueError,
     r"\bk\b.*4-D"),
    ("v-3d", lambda d: call(d, v=torch.randn(B, N, D, device=d)), ValueError, r"\bv must be 4-D"),
    ("q_sel-2d", lambda d: call(d, q_sel=torch.randn(N, D, device=d), k_sel=sel(d)), ValueError,
     r"q_sel must be 3-D"),
    ("k_sel-4d", lambda d: call(d, q_sel=sel(d), k_sel=torch.randn(B, 1, N, D, device=d)),
     ValueError, r"k_sel must be 3-D"),
    ("batch-mismatch-k", lambda d: call(d, k=torch.randn(B + 1, HKV, N, D, device=d)),
     ValueError, r"\bk must have shape"),
    ("seqlen-mismatch-v", lambda d: call(d, v=torch.randn(B, HKV, N + 1, D, device=d)),
     ValueError, r"\bv must have shape"),
    ("headdim-mismatch-k", lambda d: call(d, k=torch.randn(B, HKV, N, D + 1, device=d)),
     ValueError, r"\bk must have shape"),
    ("kv-heads-mismatch-v", lambda d: call(d, v=torch.randn(B, HKV + 1, N, D, device=d)),
     ValueError, r"\bv must have shape"),
    ("heads-not-multiple", lambda d: call(d, k=torch.randn(B, 3, N, D, device=d),
                                          v=torch.randn(B, 3, N, D, device=d)),
     ValueError, r"query heads.*multiple of the number of kv heads"),
    ("sel_head-too-big", lambda d: call(d, sel_head=HQ), ValueError, r"sel_head"),
    ("sel_head-too-negative", lambda d: call(d, sel_head=-HQ - 1), ValueError, r"sel_head"),
    ("only-q_sel", lambda d: call(d, q_sel=sel(d)), ValueError, r"q_sel and k_sel.*only q_sel"),
    ("only-k_sel", lambda d: call(d, k_sel=sel(d)), ValueError, r"q_sel and k_sel.*only k_sel"),
    ("q_sel-wrong-headdim", lambda d: call(d, q_sel=sel(d, d=D + 1), k_sel=sel(d)), ValueError,
     r"q_sel must have shape"),
    ("k_sel-wrong-seqlen", lambda d: call(d, q_sel=sel(d), k_sel=sel(d, n=N - 1)), ValueError,
     r"k_sel must have shape"),
    ("q_sel-wrong-batch", lambda d: call(d, q_sel=sel(d, b=1), k_sel=sel(d)), ValueError,
     r"q_sel must have shape"),
    ("k-dtype-mismatch", lambda d: call(d, k=good(d, torch.float64)[1]), TypeError,
     r"\bk must have the dtype of q"),
    ("v-half-q-float", lambda d: call(d, v=good(d, torch.float16)[2]), TypeError,
     r"\bv must have the dtype of q"),
    ("q_sel-dtype-mismatch", lambda d: call(d, q_sel=sel(d, torch.bfloat16), k_sel=sel(d)),
     TypeError, r"q_sel must have the dtype of q"),
    ("q-int", lambda d: selattn_ext.attention(*(t.to(torch.int64) for t in good(d))), TypeError,
     r"\bq must be float32, float64, bfloat16 or float16"),
    ("v-int", lambda d: call(d, v=good(d)[2].to(torch.int32)), TypeError,
     r"\bv must be float32, float64, bfloat16 or float16"),
    ("q-bool", lambda d: selattn_ext.attention(*(t > 0 for t in good(d)), scale=1.0), TypeError,
     r"\bq must be float"),
    ("q-last-dim-strided", lambda d: call(d, q=last_dim_strided((B, HQ, N, D), d)), ValueError,
     r"\bq must be contiguous in its last"),
    ("v-last-dim-strided", lambda d: call(d, v=last_dim_strided((B, HKV, N, D), d)), ValueError,
     r"\bv must be contiguous in its last"),
    ("k_sel-last-dim-strided",
     lambda d: call(d, q_sel=sel(d), k_sel=last_dim_strided((B, N, D), d)), ValueError,
     r"k_sel must be contiguous in its last"),
    ("head_dim-257", lambda d: selattn_ext.attention(
        *(torch.randn(1, h, 3, 257, device=d) for h in (1, 1, 1))), ValueError, r"head_dim"),
    ("scale-zero", lambda d: call(d, scale=0.0), ValueError, r"scale must be a positive finite"),
    ("scale-negative", lambda d: call(d, scale=-0.5), ValueError, r"scale must be a positive"),
    ("scale-nan", lambda d: call(d, scale=math.nan), ValueError, r"scale must be a positive"),
    ("scale-inf", lambda d: call(d, scale=math.inf), ValueError, r"scale must be a positive"),
]


@pytest.mark.parametrize("fn,exc,match",
                         [pytest.param(*c[1:], id=c[0]) for c in BAD_ATTENTION_CALLS])
def test_attention_rejects_bad_input(fn, exc, match, device):
    with pytest.raises(exc, match=match):
        fn(device)


def _f64(*shape, device, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(device)


# Valid calls right next to the rejected ones above (the last valid sel_head, head_dim 256,
# D = 1, N = 1, MQA, tiny and large scales, strided non-last dims): the checks must not reject
# them, and they must compute the right thing. (id, kwargs of `_boundary_call`)
GOOD_BOUNDARY_CALLS = [
    ("sel_head-last", dict(sel_head=HQ - 1)),
    ("sel_head-most-negative", dict(sel_head=-HQ)),
    ("explicit-selection", dict(explicit=True)),
    ("head_dim-256", dict(d=256)),
    ("head_dim-1", dict(d=1)),
    ("seqlen-1", dict(n=1)),
    ("mqa", dict(hkv=1)),
    ("mha", dict(hkv=HQ)),
    ("scale-tiny", dict(scale=1e-6)),
    ("scale-large", dict(scale=50.0)),
    ("bnhd-views", dict(bnhd=True)),
]


def _boundary_call(device, *, sel_head=0, explicit=False, d=D, n=N, hkv=HKV, scale=None,
                   bnhd=False):
    if bnhd:
        q, k, v = (_f64(B, n, h, d, device=device, seed=i).transpose(1, 2)
                   for i, h in enumerate((HQ, hkv, hkv)))
    else:
        q, k, v = (_f64(B, h, n, d, device=device, seed=i) for i, h in enumerate((HQ, hkv, hkv)))
    sel_kw = {}
    if explicit:
        sel_kw = dict(q_sel=_f64(B, n, d, device=device, seed=5),
                      k_sel=_f64(B, n, d, device=device, seed=6))
    kw = dict(scale=scale, sel_head=sel_head, return_lse=True, **sel_kw)
    return selattn_ext.attention(q, k, v, **kw), reference.attention(q, k, v, **kw)


@pytest.mark.parametrize("kwargs", [pytest.param(c[1], id=c[0]) for c in GOOD_BOUNDARY_CALLS])
def test_valid_input_at_the_boundaries_is_accepted(kwargs, device):
    skip_if_unsupported(device, torch.float64, kwargs.get("d", D))
    (out, lse), (want_out, want_lse) = _boundary_call(device, **kwargs)
    torch.testing.assert_close(out, want_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, want_lse, rtol=1e-9, atol=1e-9)


def _bwd_args(device):
    q, k, v = good(device)
    q_sel, k_sel = q[:, 0], k[:, 0]
    out, lse = torch.randn_like(q), torch.randn(B, HQ, N, device=device)
    return dict(dout=torch.randn_like(q), q=q, k=k, v=v, q_sel=q_sel, k_sel=k_sel, out=out,
                lse=lse, dlse=torch.randn(B, HQ, N, device=device), scale=0.5)


BAD_BWD_ARGS = [
    ("dout-shape", dict(dout=lambda a: a["dout"][:, :, :-1]), ValueError, r"dout must have shape"),
    ("dout-dtype", dict(dout=lambda a: a["dout"].double()), TypeError, r"dout must have the dtype"),
    ("out-shape", dict(out=lambda a: a["out"][:1]), ValueError, r"\bout must have shape"),
    ("out-last-dim-strided", dict(out=lambda a: last_dim_strided(tuple(a["out"].shape),
                                                                 a["out"].device)),
     ValueError, r"\bout must be contiguous in its last"),
    ("lse-dtype", dict(lse=lambda a: a["lse"].half()), TypeError, r"\blse must be Float"),
    ("lse-shape", dict(lse=lambda a: a["lse"][..., None]), ValueError, r"\blse must have shape"),
    ("dlse-dtype", dict(dlse=lambda a: a["dlse"].double()), TypeError, r"dlse must be Float"),
    ("dlse-shape", dict(dlse=lambda a: a["dlse"][:, :1]), ValueError, r"dlse must have shape"),
    ("bwd-scale-negative", dict(scale=lambda a: -1.0), ValueError, r"scale must be a positive"),
    ("bwd-k_sel-shape", dict(k_sel=lambda a: a["k_sel"][:, 1:]), ValueError,
     r"k_sel must have shape"),
]


@pytest.mark.parametrize("change,exc,match",
                         [pytest.param(*c[1:], id=c[0]) for c in BAD_BWD_ARGS])
def test_prefill_bwd_rejects_bad_input(change, exc, match, device):
    args = _bwd_args(device)
    args.update({name: f(args) for name, f in change.items()})
    with pytest.raises(exc, match=match):
        torch.ops.selattn.prefill_bwd(**args)


def test_raw_fwd_rejects_3d_q(device):
    q, k, v = good(device)
    with pytest.raises(ValueError, match=r"\bq must be 4-D"):
        torch.ops.selattn.prefill_fwd(q[:, 0], k, v, q[:, 0], k[:, 0], 1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
@pytest.mark.parametrize("which", ["k", "v", "q_sel"])
def test_device_mismatch_cpu_vs_cuda(which):
    q, k, v = good("cuda")
    args = dict(q=q, k=k, v=v, q_sel=q[:, 0], k_sel=k[:, 0])
    args[which] = args[which].cpu()
    with pytest.raises((ValueError, RuntimeError), match=rf"\b{which}\b.*device"):
        torch.ops.selattn.prefill_fwd(*args.values(), 0.5)


def test_device_mismatch_meta_vs_cpu():
    # Mixing a meta tensor with CPU ones dispatches to the fake kernel, which checks devices too.
    q, k, v = good("cpu")
    with pytest.raises((ValueError, RuntimeError), match=r"\bk\b.*device"):
        torch.ops.selattn.prefill_fwd(q, k.to("meta"), v, q[:, 0], k[:, 0], 0.5)
