"""The eager KV-eviction baselines of ``bench/eviction.py`` (StreamingLLM, H2O, TOVA) keep what
they claim: with v = identity, attention's output row i *is* query i's attention weights, so
the set of tokens it saw can be read off and checked against each policy's rule."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import eviction  # noqa: E402

B, H, N = 2, 3, 40


def qkv(seed=0, d=N):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, N, d, generator=g, dtype=torch.float64)
    v = torch.eye(N, dtype=torch.float64).expand(B, H, N, N)  # out[i] = weights of query i
    return q, k, v


def seen(out):
    return out > 0  # softmax weights are > 0 exactly on the visible tokens


@pytest.mark.parametrize("policy", eviction.POLICIES)
def test_no_eviction_is_causal_attention(policy):
    q, k, v = qkv()
    out = eviction.evicting_attention(q, k, v, N, policy)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("policy", eviction.POLICIES)
@pytest.mark.parametrize("budget", [1, 4, 7, 16])
def test_each_query_sees_at_most_budget_plus_itself(policy, budget):
    q, k, v = qkv(1)
    vis = seen(eviction.evicting_attention(q, k, v, budget, policy))
    counts = vis.sum(-1)
    assert bool((counts <= budget + 1).all())
    assert bool((counts == torch.clamp(torch.arange(N) + 1, max=budget + 1)).all())
    assert bool(vis.diagonal(dim1=-2, dim2=-1).all())  # itself, always
    assert not bool(vis.triu(1).any())  # never the future


@pytest.mark.parametrize("budget", [1, 4, 5, 9])
def test_streaming_loop_equals_mask(budget):
    q, k, v = qkv(2)
    loop = eviction.evicting_attention(q, k, v, budget, "streaming")
    mask = F.scaled_dot_product_attention(q, k, v, attn_mask=eviction.streaming_mask(N, budget))
    torch.testing.assert_close(loop, mask)
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    expected = (j <= i) & ((j < min(4, budget)) | (j >= i - (budget - min(4, budget))))
    assert bool((seen(loop) == expected).all())


def test_h2o_keeps_recent_window_per_head_and_heavy_hitters():
    q, k, v = qkv(3)
    budget = 10
    vis = seen(eviction.evicting_attention(q, k, v, budget, "h2o"))
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    recent = (j <= i) & (j > i - budget // 2)  # the new token plus the budget // 2 - 1 before it
    assert bool(vis[..., recent].all())
    # Heads choose their own heavy hitters: some query sees different tokens in two heads.
    assert bool((vis[:, 0] != vis[:, 1]).any())


def test_h2o_evicts_least_accumulated_mass():
    """One step past the budget, by hand: the evicted token is the one (outside the recent
    window) with the least attention summed over the queries so far."""
    q, k, v = qkv(4)
    budget = 6
    vis = seen(eviction.evicting_attention(q, k, v, budget, "h2o"))
    full = torch.softmax((q @ k.transpose(-1, -2)) * N ** -0.5
                         + torch.full((N, N), float("-inf"), dtype=q.dtype).triu(1), dim=-1)
    mass = full[:, :, :budget + 1, :budget + 1].sum(dim=2)  # queries 0..budget saw everything
    candidates = mass[..., :budget + 1 - budget // 2]
    victim = candidates.argmin(dim=-1)  # (B, H)
    after = vis[:, :, budget + 1, :budget + 1]  # what query budget + 1 sees of the old tokens
    for b in range(B):
        for h in range(H):
            assert not bool(after[b, h, victim[b, h]])
            assert int(after[b, h].sum()) == budget


def test_tova_shares_one_set_across_heads_and_drops_lowest_mean_weight():
    q, k, v = qkv(5)
    budget = 6
    out = eviction.evicting_attention(q, k, v, budget, "tova")
    vis = seen(out)
    assert bool((vis == vis[:, :1]).all())
    # Query `budget` saw budget + 1 tokens; TOVA then dropped its lowest head-averaged weight.
    weights = out[:, :, budget, :budget + 1].mean(dim=1)  # (B, budget + 1)
    victim = weights.argmin(dim=-1)
    nxt = vis[:, 0, budget + 1, :budget + 1]
    for b in range(B):
        assert not bool(nxt[b, victim[b]])
        assert int(nxt[b].sum()) == budget


def test_bad_policy():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="policy"):
        eviction.evicting_attention(q, k, v, 4, "lru")
