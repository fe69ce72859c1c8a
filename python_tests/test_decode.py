"""Pruned KV cache (DESIGN §3): selattn_ext.SelectiveKVCache + selattn_ext.decode.

Oracles: the fp64 prefill reference (selattn_ext.reference.attention) when nothing is evicted,
and the literal eager loop selattn_ext.reference.ReferenceKVCache when tokens are evicted.
"""

import pytest
import torch

import selattn_ext
from selattn_ext import SelectiveKVCache, decode
from selattn_ext.reference import ReferenceKVCache, attention as reference_attention

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(b, hq, hkv, n, d, *, dtype=torch.float64, device="cpu", seed=0, std=1.5):
    """Random q, k, v with logit std ~ std**2 >= 1, so F is large enough to matter."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64) * std
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64) * std
    v = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    return (q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype),
            v.to(device=device, dtype=dtype))


def run_chunks(q, k, v, cache, chunk, *, sel_head=0, scale=None, ref=None, on_step=None):
    """Feeds the sequence to `cache` `chunk` tokens at a time; returns the concatenated outputs
    (and the reference loop's, if given)."""
    outs, ref_outs = [], []
    n = q.shape[2]
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        outs.append(decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], cache, sel_head=sel_head,
                           scale=scale))
        if ref is not None:
            ref_outs.append(ref.step(q[:, :, sl], k[:, :, sl], v[:, :, sl]))
        if on_step is not None:
            on_step(s)
    out = torch.cat(outs, dim=2)
    return (out, torch.cat(ref_outs, dim=2)) if ref is not None else out


# ------------------------------------------------------------------------------------------
# No eviction: decoding must reproduce the prefill op at every position.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 2, 5, 16])
@pytest.mark.parametrize("hq,hkv,sel_head", [(2, 2, 0), (4, 2, 3), (6, 1, -2)])
def test_matches_prefill_fp64(device, chunk, hq, hkv, sel_head):
    b, n, d = 2, 37, 32
    q, k, v = make_inputs(b, hq, hkv, n, d, device=device, seed=chunk + hq)
    _, f = reference_attention(q, k, v, sel_head=sel_head, return_f=True)
    assert f.max() > 1.0  # F really lowers logits
    cache = SelectiveKVCache(b, hkv, d, budget=n, max_chunk=chunk, dtype=torch.float64,
                             device=device)
    out = run_chunks(q, k, v, cache, chunk, sel_head=sel_head)
    expected = reference_attention(q, k, v, sel_head=sel_head)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert cache.positions() == [list(range(n))] * b
    assert cache.seq_lengths == [n] * b


@pytest.mark.parametrize("chunk", [1, 6])
def test_matches_fused_prefill_op(device, chunk):
    # The same check against the package's own fused prefill op (selattn_ext.attention).
    b, hq, hkv, n, d = 2, 4, 2, 30, 32
    q, k, v = make_inputs(b, hq, hkv, n, d, device=device, seed=40 + chunk)
    expected = selattn_ext.attention(q, k, v, sel_head=1)
    cache = SelectiveKVCache(b, hkv, d, budget=n, max_chunk=chunk, dtype=torch.float64,
                             device=device)
    out = run_chunks(q, k, v, cache, chunk, sel_head=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("chunk", [1, 4])
def test_matches_prefill_low_precision(device, dtype, chunk):
    b, hq, hkv, n, d = 2, 4, 2, 48, 64
    q, k, v = make_inputs(b, hq, hkv, n, d, dtype=dtype, device=device, seed=7)
    oracle = reference_attention(q.double(), k.double(), v.double())
    eager = reference_attention(q, k, v)
    cache = SelectiveKVCache(b, hkv, d, budget=n, max_chunk=chunk, dtype=dtype, device=device)
    out = run_chunks(q, k, v, cache, chunk)
    assert out.dtype == dtype
    err = (out.double() - oracle).abs().max().item()
    eager_err = (eager.double() - oracle).abs().max().item()
    assert err <= 2 * eager_err + 1e-5, (err, eager_err)


def test_strided_inputs(device):
    # (B, c, H, D) projections passed as .transpose(1, 2): no copy needed, same result.
    b, hq, hkv, n, d = 2, 4, 2, 12, 16
    q, k, v = make_inputs(b, hq, hkv, n, d, device=device, seed=3)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert qt.stride() != q.stride()
    cache = SelectiveKVCache(b, hkv, d, budget=n, max_chunk=3, dtype=torch.float64, device=device)
    out = run_chunks(qt, kt, vt, cache, 3)
    torch.testing.assert_close(out, reference_attention(q, k, v), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------
# Eviction: against the literal eager loop of §3.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget,chunk", [(6, 1), (8, 3), (5, 5), (16, 2)])
@pytest.mark.parametrize("hq,hkv,sel_head", [(2, 2, 0), (4, 2, 1), (6, 1, 5)])
def test_eviction_matches_reference_loop(device, budget, chunk, hq, hkv, sel_head):
    b, n, d = 2, 41, 16
    q, k, v = make_inputs(b, hq, hkv, n, d, device=device, seed=budget * 10 + chunk)
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk, dtype=torch.float64,
                             device=device)
    ref = ReferenceKVCache(budget, sel_head=sel_head)

    def check(step_start):
        assert cache.positions() == ref.positions()
        for kept in cache.positions():
            assert len(kept) <= budget and kept[0] == 0

    out, ref_out = run_chunks(q, k, v, cache, chunk, sel_head=sel_head, ref=ref, on_step=check)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    assert all(len(kept) == budget for kept in cache.positions())
    # Pruning changed the result (slightly: the evicted tokens are the ones F already
    # suppressed), so this really exercised eviction.
    full = reference_attention(q, k, v, sel_head=sel_head)
    assert (out - full).abs().max() > 1e-8


@pytest.mark.parametrize("chunk", [1, 4])
def test_tau_mode(device, chunk):
    b, hq, hkv, n, d, budget, tau = 2, 4, 2, 40, 16, 20, 2.0
    q, k, v = make_inputs(b, hq, hkv, n, d, device=device, seed=11)
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk, tau=tau, dtype=torch.float64,
                             device=device)
    ref = ReferenceKVCache(budget, tau=tau)
    sizes = []

    def check(step_start):
        assert cache.positions() == ref.positions()
        sizes.append(min(len(p) for p in cache.positions()))
        valid = cache.pos >= 0
        assert bool((cache.f[valid] <= tau).all())

    out, ref_out = run_chunks(q, k, v, cache, chunk, ref=ref, on_step=check)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    # The threshold, not the budget, did the evicting.
    assert min(sizes[-3:]) < budget


def test_negative_tau_keeps_only_bos_and_nothing_breaks(device):
    b, hq, hkv, n, d = 1, 2, 1, 10, 8
    q, k, v = make_inputs(b, hq, hkv, n, d, device=device, seed=2)
    cache = SelectiveKVCache(b, hkv, d, budget=8, tau=-1.0, dtype=torch.float64, device=device)
    ref = ReferenceKVCache(8, tau=-1.0)
    out, ref_out = run_chunks(q, k, v, cache, 1, ref=ref)
    assert cache.positions() == [[0]]
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3])
def test_budget_one(device, chunk):
    b, hq, hkv, n, d = 2, 2, 2, 17, 8
    q, k, v = make_inputs(b, hq, hkv, n, d, device=device, seed=5)
    cache = SelectiveKVCache(b, hkv, d, budget=1, max_chunk=chunk, dtype=torch.float64,
                             device=device)
    ref = ReferenceKVCache(1)

    def check(step_start):
        assert cache.positions() == [[0]] * b

    out, ref_out = run_chunks(q, k, v, cache, chunk, ref=ref, on_step=check)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    if chunk == 1:
        # Token t >= 1 sees only BOS and itself, both with F = 0.
        logits = torch.stack([(q[:, :, 1:] * k[:, :, :1]).sum(-1),
                              (q[:, :, 1:] * k[:, :, 1:]).sum(-1)], -1) * d ** -0.5
        w = torch.softmax(logits, -1)
        expected = w[..., :1] * v[:, :, :1] + w[..., 1:] * v[:, :, 1:]
        torch.testing.assert_close(out[:, :, 1:], expected, rtol=0, atol=1e-10)


def test_bos_never_evicted_on_ties(device):
    # Selection logits all negative: F = 0 everywhere, so every eviction is a tie and must go to
    # the oldest position other than BOS (position 0, the oldest of all).
    b, hkv, n, d, budget = 1, 1, 20, 4, 4
    gen = torch.Generator().manual_seed(0)
    k = torch.ones(b, hkv, n, d, dtype=torch.float64)
    q = -torch.rand(b, 2, n, d, generator=gen, dtype=torch.float64) - 0.5
    v = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    q, k, v = q.to(device), k.to(device), v.to(device)
    cache = SelectiveKVCache(b, hkv, d, budget, dtype=torch.float64, device=device)
    for t in range(n):
        decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], cache)
        assert cache.positions()[0] == [0] + list(range(max(1, t - budget + 2), t + 1))
    assert bool((cache.f == 0).all())


def test_bos_kept_when_its_key_is_selected_hardest(device):
    # BOS gets no F by definition even when the selection head points at it; the rest are pruned.
    b, hq, hkv, n, d, budget = 1, 2, 1, 30, 8, 3
    q, k, v = make_inputs(b, hq, hkv, n, d, device=device, seed=9, std=2.0)
    k[:, :, 0] = q[:, 0].mean(dim=1) * 10
    cache = SelectiveKVCache(b, hkv, d, budget, dtype=torch.float64, device=device)
    ref = ReferenceKVCache(budget)
    out, ref_out = run_chunks(q, k, v, cache, 1, ref=ref,
                              on_step=lambda s: cache.positions()[0][0] == 0 or pytest.fail())
    assert cache.positions() == ref.positions()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------
# Ragged batches
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [6, 64])
def test_ragged_lengths(device, budget):
    b, hq, hkv, d, chunk = 3, 4, 2, 16, 4
    steps = [[4, 2, 0], [1, 4, 3], [4, 4, 4], [0, 1, 2], [3, 4, 1], [4, 2, 4]]
    total = [sum(s[i] for s in steps) for i in range(b)]
    q, k, v = make_inputs(b, hq, hkv, chunk * len(steps), d, device=device, seed=21)
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk, dtype=torch.float64,
                             device=device)
    ref = ReferenceKVCache(budget)
    for i, lengths in enumerate(steps):
        sl = slice(i * chunk, (i + 1) * chunk)
        lt = torch.tensor(lengths, device=device) if i % 2 else lengths
        out = decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], cache, lengths=lt)
        ref_out = ref.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], lengths=lengths)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
        for bi, m in enumerate(lengths):
            assert bool((out[bi, :, m:] == 0).all())
        assert cache.positions() == ref.positions()
    assert cache.seq_lengths == total

    # Each sequence of the ragged batch equals that sequence decoded alone.
    for bi in range(b):
        idx = torch.cat([torch.arange(i * chunk, i * chunk + s[bi]) for i, s in enumerate(steps)])
        idx = idx.to(device)
        qs, ks, vs = (t[bi:bi + 1].index_select(2, idx) for t in (q, k, v))
        alone = SelectiveKVCache(1, hkv, d, budget, dtype=torch.float64, device=device)
        alone_out = run_chunks(qs, ks, vs, alone, 1)
        assert alone.positions()[0] == cache.positions()[bi]
        if budget >= total[bi]:
            torch.testing.assert_close(alone_out, reference_attention(qs, ks, vs), rtol=0,
                                       atol=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_random_schedules(device, seed):
    # Varying chunk sizes, ragged lengths, budgets, tau and head layouts against the eager loop.
    gen = torch.Generator().manual_seed(100 + seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))  # noqa: E731
    hkv = rand(1, 2)
    hq = hkv * rand(1, 3)
    b, d, max_chunk = rand(1, 3), 8 * rand(1, 4), rand(1, 6)
    budget = rand(1, 12)
    tau = None if seed % 2 else float(torch.rand((), generator=gen)) * 4
    sel_head = rand(-hq, hq - 1)
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=max_chunk, tau=tau,
                             dtype=torch.float64, device=device)
    ref = ReferenceKVCache(budget, tau=tau, sel_head=sel_head)
    for step in range(12):
        c = rand(1, max_chunk)
        q, k, v = make_inputs(b, hq, hkv, c, d, device=device, seed=1000 * seed + step)
        lengths = [rand(0, c) for _ in range(b)] if step % 3 == 2 else None
        out = decode(q, k, v, cache, sel_head=sel_head, lengths=lengths)
        ref_out = ref.step(q, k, v, lengths=lengths)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
        assert cache.positions() == ref.positions()
        assert cache.seq_lengths == [s["length"] for s in ref.seqs]


# ------------------------------------------------------------------------------------------
# Storage
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_memory_independent_of_length(device, dtype):
    b, hq, hkv, d, budget, chunk = 2, 4, 2, 32, 16, 4
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk, dtype=dtype, device=device)
    slots = budget + chunk
    f_bytes = 8 if dtype == torch.float64 else 4
    elt = torch.empty((), dtype=dtype).element_size()
    expected = 2 * b * hkv * slots * d * elt + b * slots * (f_bytes + 8) + b * 8
    assert cache.state_bytes() == expected
    workspace = cache.workspace_bytes()
    assert cache.memory_bytes() == expected + workspace
    ptrs = [t.data_ptr() for t in (cache.k_cache, cache.v_cache, cache.f, cache.pos)]
    q, k, v = make_inputs(b, hq, hkv, 300, d, dtype=dtype, device=device, seed=1)
    run_chunks(q, k, v, cache, chunk)
    assert cache.state_bytes() == expected
    assert cache.memory_bytes() == expected + workspace
    assert cache.k_cache.shape == (b, hkv, slots, d)
    assert [t.data_ptr() for t in (cache.k_cache, cache.v_cache, cache.f, cache.pos)] == ptrs
    assert cache.seq_lengths == [300] * b
    assert all(len(p) == budget and p[0] == 0 for p in cache.positions())


def test_reset(device):
    b, hq, hkv, n, d = 2, 2, 1, 20, 8
    q, k, v = make_inputs(b, hq, hkv, n, d, device=device, seed=4)
    cache = SelectiveKVCache(b, hkv, d, 5, max_chunk=2, dtype=torch.float64, device=device)
    first = run_chunks(q, k, v, cache, 2)
    cache.reset()
    assert cache.positions() == [[], []] and cache.seq_lengths == [0, 0]
    second = run_chunks(q, k, v, cache, 2)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

def _small(device="cpu", dtype=torch.float32, c=1):
    cache = SelectiveKVCache(2, 2, 8, 4, max_chunk=2, dtype=dtype, device=device)
    q = torch.randn(2, 4, c, 8, dtype=dtype, device=device)
    k = torch.randn(2, 2, c, 8, dtype=dtype, device=device)
    return cache, q, k, k.clone()


def test_bad_cache_arguments():
    with pytest.raises(ValueError, match="budget"):
        SelectiveKVCache(1, 1, 8, 0)
    with pytest.raises(ValueError, match="max_chunk"):
        SelectiveKVCache(1, 1, 8, 4, max_chunk=0)
    with pytest.raises(TypeError, match="budget"):
        SelectiveKVCache(1, 1, 8, 4.5)
    with pytest.raises(TypeError, match="dtype"):
        SelectiveKVCache(1, 1, 8, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="tau"):
        SelectiveKVCache(1, 1, 8, 4, tau=float("nan"))


def test_bad_decode_arguments():
    cache, q, k, v = _small(c=3)
    with pytest.raises(ValueError, match="max_chunk"):
        decode(q, k, v, cache)
    cache, q, k, v = _small()
    with pytest.raises(ValueError, match="num_kv_heads"):
        decode(q, k[:, :1], v[:, :1], cache)
    with pytest.raises(ValueError, match="multiple"):
        decode(q[:, :3], k, v, cache)
    with pytest.raises(ValueError, match="head_dim"):
        decode(q[..., :4], k[..., :4], v[..., :4], cache)
    with pytest.raises(ValueError, match="batch_size"):
        decode(q[:1], k[:1], v[:1], cache)
    with pytest.raises(ValueError, match=r"v must have shape"):
        decode(q, k, v[:, :, :, :4], cache)
    with pytest.raises(TypeError, match="dtype"):
        decode(q.double(), k.double(), v.double(), cache)
    with pytest.raises(TypeError, match="v must have the cache's dtype"):
        decode(q, k, v.half(), cache)
    with pytest.raises(ValueError, match="device"):
        decode(q.to("meta"), k, v, cache)
    with pytest.raises(ValueError, match="sel_head"):
        decode(q, k, v, cache, sel_head=4)
    with pytest.raises(ValueError, match="4-D"):
        decode(q[:, :, 0], k, v, cache)
    with pytest.raises(ValueError, match="lengths"):
        decode(q, k, v, cache, lengths=[1, 2])
    with pytest.raises(ValueError, match="lengths"):
        decode(q, k, v, cache, lengths=torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="lengths"):
        decode(q, k, v, cache, lengths=[1, 1, 1])
    with pytest.raises(TypeError, match="lengths"):
        decode(q, k, v, cache, lengths=torch.tensor([1.0, 1.0]))
    # Nothing above touched the cache.
    assert cache.seq_lengths == [0, 0] and cache.positions() == [[], []]


def _raw_args(cache, q, k, v):
    return [q, k, v, cache.k_cache, cache.v_cache, cache.f, cache.pos, cache.seq_len, None,
            0.35, 0, cache.budget, None]


@pytest.mark.parametrize("index,value,exc,match", [
    (5, "f64", TypeError, "f must be"),
    (6, "int32", TypeError, "pos must be"),
    (7, "short", ValueError, "seq_len must have shape"),
    (8, "lengths_big", ValueError, "lengths must be in"),
    (9, -1.0, ValueError, "scale"),
    (10, 4, ValueError, "sel_head"),
    (11, 0, ValueError, "budget"),
    (11, 3, ValueError, "slots - budget"),
    (12, float("nan"), ValueError, "tau"),
])
def test_raw_op_checks(index, value, exc, match):
    cache, q, k, v = _small(c=2)
    args = _raw_args(cache, q, k, v)
    if value == "f64":
        value = cache.f.double()
    elif value == "int32":
        value = cache.pos.int()
    elif value == "short":
        value = cache.seq_len[:1]
    elif value == "lengths_big":
        value = torch.tensor([3, 0])
    elif index == 11 and value == 3:
        args[11] = 5  # slots = 4 + 2 = 6: a chunk of 2 does not fit next to a budget of 5
        value = 5
    args[index] = value
    with pytest.raises(exc, match=match):
        selattn_ext.ops.decode_step(*args)


def test_raw_op_rejects_integer_and_mismatched_tensors():
    cache, q, k, v = _small()
    args = _raw_args(cache, q, k, v)
    args[0] = q.to(torch.int32)
    with pytest.raises(TypeError, match="q must be"):
        selattn_ext.ops.decode_step(*args)
    args = _raw_args(cache, q, k, v)
    args[3] = cache.k_cache[:, :, :3]
    with pytest.raises(ValueError, match="v_cache must have shape|k_cache"):
        selattn_ext.ops.decode_step(*args)


# ------------------------------------------------------------------------------------------
# Op registration
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_lengths,tau", [(False, None), (True, 0.5)])
def test_opcheck(device, with_lengths, tau):
    b, hq, hkv, d, budget, chunk = 2, 4, 2, 16, 3, 2
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk, tau=tau, device=device)
    q, k, v = make_inputs(b, hq, hkv, 6, d, dtype=torch.float32, device=device, seed=8)
    # Put the cache in a mid-sequence state with evictions behind it.
    run_chunks(q[:, :, :4], k[:, :, :4], v[:, :, :4], cache, chunk)
    lengths = torch.tensor([2, 1], device=device) if with_lengths else None
    args = (q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], cache.k_cache, cache.v_cache, cache.f,
            cache.pos, cache.seq_len, lengths, d ** -0.5, 1, budget, tau)
    torch.library.opcheck(torch.ops.selattn.decode_step.default, args)


def test_torch_compile_fullgraph():
    # The mutating op traces under torch.compile (fake impl + schema aliasing), through the
    # public wrapper, and keeps the cache state identical to eager.
    b, hq, hkv, d, budget = 1, 4, 2, 16, 4
    compiled_cache = SelectiveKVCache(b, hkv, d, budget, dtype=torch.float64)
    eager_cache = SelectiveKVCache(b, hkv, d, budget, dtype=torch.float64)

    @torch.compile(fullgraph=True)
    def step(q, k, v):
        return decode(q, k, v, compiled_cache) * 2

    q, k, v = make_inputs(b, hq, hkv, 8, d, seed=12)
    for t in range(8):
        sl = slice(t, t + 1)
        got = step(q[:, :, sl], k[:, :, sl], v[:, :, sl])
        want = decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], eager_cache) * 2
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert compiled_cache.positions() == eager_cache.positions()
    assert len(compiled_cache.positions()[0]) == budget
