"""selattn_ext.nn.SelectiveSelfAttention: prefill equals a manual computation with the reference,
cached decoding (token by token, chunked, ragged) equals prefill, RoPE is relative."""

import pytest
import torch

import selattn_ext
from selattn_ext import SelectiveKVCache, reference
from selattn_ext.nn import RotaryEmbedding, SelectiveSelfAttention


def make_module(device, dtype=torch.float64, heads=4, kv_heads=2, sel_head=0, rope=True, seed=0):
    torch.manual_seed(seed)
    m = SelectiveSelfAttention(64, heads, kv_heads, rope=rope, sel_head=sel_head).to(device, dtype)
    with torch.no_grad():  # larger q/k weights: selection logits of std > 1, so F matters
        m.qkv.weight.mul_(4.0)
    return m


def manual_forward(m, x):
    b, n, _ = x.shape
    qkv = m.qkv(x).view(b, n, m.num_heads + 2 * m.num_kv_heads, m.head_dim)
    q, k, v = qkv.split([m.num_heads, m.num_kv_heads, m.num_kv_heads], dim=2)
    if m.rotary is not None:
        pos = torch.arange(n, device=x.device)
        q, k = m.rotary(q, pos), m.rotary(k, pos)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out, f = reference.attention(q, k, v, sel_head=m.sel_head, return_f=True)
    return m.out_proj(out.transpose(1, 2).reshape(b, n, -1)), f


@pytest.mark.parametrize("heads,kv_heads,sel_head,rope", [(4, 2, 0, True), (4, 4, -1, False), (8, 1, 2, True)])
def test_prefill_matches_manual_reference(device, heads, kv_heads, sel_head, rope):
    m = make_module(device, heads=heads, kv_heads=kv_heads, sel_head=sel_head, rope=rope)
    x = torch.randn(2, 37, 64, device=device, dtype=torch.float64)
    expected, f = manual_forward(m, x)
    assert f.max() > 1.0  # F is not negligible
    torch.testing.assert_close(m(x), expected, rtol=1e-9, atol=1e-9)


def test_gradients_match_manual_reference(device):
    m = make_module(device)
    x = torch.randn(2, 19, 64, device=device, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(m(x).square().sum(), [x, *m.parameters()])
    ref = torch.autograd.grad(manual_forward(m, x)[0].square().sum(), [x, *m.parameters()])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_cached_decoding_matches_prefill(device, chunk):
    m = make_module(device)
    b, n = 2, 23
    x = torch.randn(b, n, 64, device=device, dtype=torch.float64)
    full = m(x)
    cache = SelectiveKVCache(b, m.num_kv_heads, m.head_dim, budget=n, max_chunk=chunk,
                             dtype=torch.float64, device=device)
    # Feed in uneven pieces: the module splits each call into max_chunk steps itself.
    pieces, start = [], 0
    for size in (1, 5, 2, 9, 6):
        pieces.append(m(x[:, start:start + size], cache))
        start += size
    assert start == n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)
    assert cache.seq_lengths == [n, n]


def test_ragged_lengths_continue_positions_per_sequence(device):
    m = make_module(device)
    x = torch.randn(2, 12, 64, device=device, dtype=torch.float64)
    cache = SelectiveKVCache(2, m.num_kv_heads, m.head_dim, budget=32, max_chunk=4,
                             dtype=torch.float64, device=device)
    # Sequence 1 gets 3 valid tokens in the first call, then continues at position 3.
    first = m(x[:, :5], cache, lengths=torch.tensor([5, 3]))
    assert cache.seq_lengths == [5, 3]
    cache_rest = m(torch.stack([x[0, 5:12], x[1, 3:10]]), cache)
    full1 = m(torch.cat([x[1:, :3], x[1:, 3:10]], dim=1))
    torch.testing.assert_close(first[1, :3], full1[0, :3], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cache_rest[1], full1[0, 3:10], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat([first[0], cache_rest[0]]), m(x[:1])[0], rtol=1e-9, atol=1e-9)


def test_pruned_cache_stays_within_budget(device):
    m = make_module(device)
    cache = SelectiveKVCache(1, m.num_kv_heads, m.head_dim, budget=6, dtype=torch.float64, device=device)
    m(torch.randn(1, 40, 64, device=device, dtype=torch.float64), cache)
    kept = cache.positions()[0]
    assert len(kept) == 6 and kept[0] == 0 and kept[-1] == 39


def test_plain_attention_ablation_is_causal_attention(device):
    # The oracle is written out (causal softmax in fp64), not SDPA again: the module itself
    # calls SDPA, so comparing with SDPA would test nothing. GQA: head h reads kv head h // 2.
    m = SelectiveSelfAttention(64, 4, 2, selective=False).to(device, torch.float64)
    x = torch.randn(2, 17, 64, device=device, dtype=torch.float64)
    q, k, v = m._project(x, torch.arange(17, device=device))
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    logits = (q @ kk.transpose(-1, -2)) * m.head_dim ** -0.5
    future = torch.ones(17, 17, dtype=torch.bool, device=device).triu(1)
    o = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1) @ vv
    expected = m.out_proj(o.transpose(1, 2).reshape(2, 17, 64))
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
    # ... and it differs from the selective module with the same weights (F is not zero).
    sel = make_module(device)
    plain = SelectiveSelfAttention(64, 4, 2, selective=False).to(device, torch.float64)
    plain.load_state_dict(sel.state_dict())
    assert (sel(x) - plain(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="selective=True"):
        m(x, SelectiveKVCache(2, 2, 16, budget=4, dtype=torch.float64, device=device))


def test_rope_is_relative(device):
    rope = RotaryEmbedding(16).to(device)
    q, k = torch.randn(2, 1, 1, 16, device=device).unbind(0)
    def score(i, j):
        qi = rope(q[None], torch.tensor([i], device=device))
        kj = rope(k[None], torch.tensor([j], device=device))
        return (qi * kj).sum()
    torch.testing.assert_close(score(7, 3), score(104, 100), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 5), atol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(embed_dim=65, num_heads=4), "embed_dim"),
    (dict(embed_dim=64, num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(embed_dim=64, num_heads=4, sel_head=4), "sel_head"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectiveSelfAttention(**kwargs)


def test_bad_forward_input(device):
    m = make_module(device)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 5, 32, device=device, dtype=torch.float64))
