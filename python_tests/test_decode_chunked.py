"""Chunked prefill through the pruned KV cache (DESIGN §3 with c > 1), and what the cache holds.

Oracles: selattn_ext.reference.ReferenceKVCache run in fp64 on the same (upcast) inputs; the
fp64 prefill reference when nothing is evicted. Low-precision paths follow DESIGN §7: the error
against the fp64 oracle may be at most twice that of the same eager loop run in the test dtype,
plus 1e-5.
"""

import pytest
import torch

from selattn_ext import SelectiveKVCache, decode
from selattn_ext.reference import ReferenceKVCache, attention as reference_attention

ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
CHUNKS = [2, 7, 64, 300]


def make_inputs(b, hq, hkv, n, d, *, dtype, device="cpu", seed=0, std=1.5):
    """Random q, k, v (logit std ~ std**2 >= 1, so F matters), drawn in fp64 then rounded."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64) * std
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64) * std
    v = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def feed(q, k, v, chunk, *, caches, lengths_schedule=None, sel_head=0):
    """Feeds q/k/v `chunk` tokens at a time to each callable in `caches` (name -> step(q, k, v,
    lengths)). With a lengths schedule, step i passes lengths_schedule[i] (ragged batch: the
    first lengths[b] tokens of the slice are sequence b's next tokens). Returns the outputs per
    name, each (B, H, steps * chunk, D) with the rows beyond a length left as returned."""
    outs = {name: [] for name in caches}
    n = q.shape[2]
    for i, s in enumerate(range(0, n, chunk)):
        sl = slice(s, min(s + chunk, n))
        lengths = None if lengths_schedule is None else lengths_schedule[i]
        for name, step in caches.items():
            outs[name].append(step(q[:, :, sl], k[:, :, sl], v[:, :, sl], lengths))
    return {name: torch.cat(o, dim=2) for name, o in outs.items()}


def ours(cache, sel_head):
    return lambda q, k, v, lengths: decode(q, k, v, cache, sel_head=sel_head, lengths=lengths)


def ref_step(ref, dtype):
    return lambda q, k, v, lengths: ref.step(q.to(dtype), k.to(dtype), v.to(dtype),
                                             lengths=lengths)


def check_against_oracle(out, eager, oracle, dtype):
    """fp64: equal to 1e-10. Otherwise DESIGN §7: at most twice the eager loop's error."""
    if dtype == torch.float64:
        torch.testing.assert_close(out, oracle, rtol=0, atol=1e-10)
        return
    err = (out.double() - oracle).abs().max().item()
    eager_err = (eager.double() - oracle).abs().max().item()
    assert err <= 2 * eager_err + 1e-5, (err, eager_err)


# ------------------------------------------------------------------------------------------
# Chunked prefill with eviction against the eager loop
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("budget", [24, 4096])  # binding / never reached
def test_chunked_matches_reference(dtype, chunk, budget):
    b, hq, hkv, d, sel_head = 2, 4, 2, 32, 3  # GQA, the selection head in the second group
    n = max(2 * chunk + chunk // 2, 40)  # at least two full chunks and a partial one
    q, k, v = make_inputs(b, hq, hkv, n, d, dtype=dtype, seed=chunk + budget)
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk, dtype=dtype)
    oracle = ReferenceKVCache(budget, sel_head=sel_head)
    steps = {"ours": ours(cache, sel_head), "oracle": ref_step(oracle, torch.float64)}
    if dtype != torch.float64:  # fp64 is compared with the oracle directly
        steps["eager"] = ref_step(ReferenceKVCache(budget, sel_head=sel_head), dtype)
    out = feed(q, k, v, chunk, caches=steps)
    assert out["ours"].dtype == dtype
    assert cache.positions() == oracle.positions()
    check_against_oracle(out["ours"], out.get("eager"), out["oracle"], dtype)
    if budget < n:
        assert all(len(p) == budget and p[0] == 0 for p in cache.positions())
        assert (out["oracle"] - reference_attention(q.double(), k.double(), v.double(),
                                                    sel_head=sel_head)).abs().max() > 1e-12
    else:
        assert cache.positions() == [list(range(n))] * b
        # No eviction: the chunks reproduce the prefill op at every position.
        full = reference_attention(q.double(), k.double(), v.double(), sel_head=sel_head)
        check_against_oracle(out["ours"], out.get("eager"), full, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("chunk", [7, 64])
@pytest.mark.parametrize("tau", [None, 3.0])
def test_chunked_ragged(dtype, chunk, tau):
    b, hq, hkv, d, budget, sel_head = 3, 6, 2, 16, 20, -1
    gen = torch.Generator().manual_seed(chunk)
    steps = 6
    schedule = [[int(x) for x in torch.randint(0, chunk + 1, (b,), generator=gen)]
                for _ in range(steps)]
    schedule[1][0] = chunk  # every sequence gets a full chunk at some point
    schedule[2][1] = chunk
    schedule[3][2] = chunk
    q, k, v = make_inputs(b, hq, hkv, steps * chunk, d, dtype=dtype, seed=5 * chunk)
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk, tau=tau, dtype=dtype)
    oracle = ReferenceKVCache(budget, tau=tau, sel_head=sel_head)
    eager = ReferenceKVCache(budget, tau=tau, sel_head=sel_head)
    out = feed(q, k, v, chunk, lengths_schedule=schedule,
               caches={"ours": ours(cache, sel_head), "oracle": ref_step(oracle, torch.float64),
                       "eager": ref_step(eager, dtype)})
    assert cache.positions() == oracle.positions()
    assert cache.seq_lengths == [sum(s[i] for s in schedule) for i in range(b)]
    for i, lengths in enumerate(schedule):
        for bi, m in enumerate(lengths):
            assert bool((out["ours"][bi, :, i * chunk + m:(i + 1) * chunk] == 0).all())
    check_against_oracle(out["ours"], out["eager"], out["oracle"], dtype)
    if tau is not None:
        valid = cache.pos >= 0
        assert bool((cache.f[valid] <= tau).all())


# ------------------------------------------------------------------------------------------
# Eviction order: ties, tau, BOS
# ------------------------------------------------------------------------------------------

def tied_inputs(b, hkv, n, d, chunk, dtype):
    """Selection by the last token of each chunk only, with the same logit 1 for every key:
    the tokens of one chunk keep exactly equal F (an integer) for as long as they live."""
    q = torch.zeros(b, 2 * hkv, n, d, dtype=torch.float64)
    q[:, 0, chunk - 1::chunk, 0] = 1.0  # selection head 0: the chunk's last query
    q[:, 1:] = torch.randn(b, 2 * hkv - 1, n, d, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    k = torch.zeros(b, hkv, n, d, dtype=torch.float64)
    k[..., 0] = 1.0
    v = torch.randn(b, hkv, n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("chunk,budget,tau", [(7, 10, None), (7, 10, 1.5), (64, 80, 1.5),
                                              (64, 100, None), (2, 3, 0.5)])
def test_ties_evict_oldest(dtype, chunk, budget, tau):
    b, hkv, d = 1, 1, 8
    n = 5 * chunk
    q, k, v = tied_inputs(b, hkv, n, d, chunk, dtype)
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk, tau=tau, dtype=dtype)
    oracle = ReferenceKVCache(budget, tau=tau, scale=1.0)
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], cache, scale=1.0)
        oracle.step(q[:, :, sl].double(), k[:, :, sl].double(), v[:, :, sl].double())
        kept = cache.positions()[0]
        assert kept == oracle.positions()[0]
        assert kept[0] == 0
        # Equal F within a chunk: whenever a chunk's tokens were only partly evicted, the
        # survivors are its youngest.
        for c0 in range(0, s + chunk, chunk):
            mine = [p for p in kept if c0 <= p < c0 + chunk and p > 0]
            if mine:
                assert mine == list(range(c0 + chunk - len(mine), c0 + chunk)), (c0, kept)
        valid = cache.pos >= 0
        if tau is not None:
            assert bool((cache.f[valid] <= tau).all())
    if tau is None:
        assert float(cache.f.max()) >= 1.0  # F really was non-zero and tied


@pytest.mark.parametrize("chunk", [2, 7, 64])
def test_zero_selection_keeps_bos_and_most_recent(chunk):
    # All selection logits negative: F = 0 for every token, so each eviction is a tie and goes
    # to the oldest non-BOS position.
    b, hkv, d, budget = 2, 1, 4, 5
    n = 4 * chunk + 3
    k = torch.ones(b, hkv, n, d)
    q = -torch.rand(b, 2, n, d, generator=torch.Generator().manual_seed(0)) - 0.5
    v = torch.randn(b, hkv, n, d, generator=torch.Generator().manual_seed(1))
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk)
    seen = 0
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], cache)
        seen = min(s + chunk, n)
        expected = [0] + list(range(max(1, seen - budget + 1), seen))
        assert cache.positions() == [expected] * b
    assert bool((cache.f == 0).all())


# ------------------------------------------------------------------------------------------
# Stale data in free slots never leaks into the output
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 16])
@pytest.mark.parametrize("hq", [2, 8])  # streaming and tiled attention
def test_free_slots_with_nan_do_not_leak(chunk, hq):
    b, hkv, d, budget = 1, 1, 16, 40
    q, k, v = make_inputs(b, hq, hkv, 2 * chunk, d, dtype=torch.float32, seed=3)
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk)
    cache.k_cache.fill_(float("nan"))  # every slot is free: nothing in them may be read
    cache.v_cache.fill_(float("nan"))
    out = feed(q, k, v, chunk, caches={"ours": ours(cache, 0)})["ours"]
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), reference_attention(q.double(), k.double(),
                                                                 v.double()),
                               rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_memory_bytes_counts_state_and_workspace(dtype):
    b, hkv, d, budget, chunk = 2, 2, 32, 48, 16
    cache = SelectiveKVCache(b, hkv, d, budget, max_chunk=chunk, dtype=dtype)
    tensors = [t for t in vars(cache).values() if isinstance(t, torch.Tensor)]
    assert cache.state_bytes() == sum(t.numel() * t.element_size() for t in tensors)
    ws = cache.workspace_bytes()
    acc = 8 if dtype == torch.float64 else 4
    # At least the per-sequence F offsets of a full chunk against every slot.
    assert ws >= b * chunk * (budget + chunk) * acc
    assert cache.memory_bytes() == cache.state_bytes() + ws
    # Fixed at construction: feeding tokens changes nothing; more budget costs more.
    q, k, v = make_inputs(b, 4, hkv, 200, d, dtype=dtype, seed=1)
    feed(q, k, v, chunk, caches={"ours": ours(cache, 0)})
    assert cache.workspace_bytes() == ws
    bigger = SelectiveKVCache(b, hkv, d, 4 * budget, max_chunk=chunk, dtype=dtype)
    assert bigger.workspace_bytes() > ws and bigger.state_bytes() > cache.state_bytes()


def test_memory_bytes_scales_with_threads():
    cache = SelectiveKVCache(1, 2, 64, 256, max_chunk=32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cache.workspace_bytes()
        torch.set_num_threads(2)
        two = cache.workspace_bytes()
    finally:
        torch.set_num_threads(before)
    assert two > one > 0
