"""``selattn_ext.pruning``: per-layer budget calibration for the pruned KV cache.

A tiny selective LM is trained for a few seconds on sequences that repeat with period 8 (token
t = token t - 8), so it needs the token 8 back and not much else: pruning to a few tokens per
layer is possible, pruning to one is not. Every loss claimed by the search is re-measured
independently, through one explicit ``SelectiveKVCache`` per layer."""

import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selattn_ext
from selattn_ext import pruning
from selattn_ext.nn import SelectiveSelfAttention

V, BOS, N, PERIOD = 16, 16, 40, 8


class TinyLM(nn.Module):
    def __init__(self, dim=32, layers=2, heads=2):
        super().__init__()
        self.embed = nn.Embedding(V + 1, dim)
        self.attns = nn.ModuleList(SelectiveSelfAttention(dim, heads) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim),
                                                nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, V)

    def forward(self, tokens, caches=None):
        x = self.embed(tokens)
        for i, (attn, mlp, norm) in enumerate(zip(self.attns, self.mlps, self.norms)):
            x = x + attn(norm(x), None if caches is None else caches[i])
            x = x + mlp(x)
        return self.head(x)


def periodic_batch(gen, batch=16):
    """(inputs, targets): BOS then a random 8-token pattern repeated; targets are the next
    tokens (the first 8 are unpredictable, the rest copy from 8 back)."""
    pattern = torch.randint(0, V, (batch, PERIOD), generator=gen)
    seq = pattern.repeat(1, N // PERIOD + 1)[:, :N]
    inputs = torch.cat([torch.full((batch, 1), BOS), seq[:, :-1]], dim=1)
    return inputs, seq


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Hundreds of tiny decode steps: on a busy 2-core machine one thread is several times
    # faster than two (no spinning at every op's barrier). Results do not depend on it.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        inputs, targets = periodic_batch(gen)
        loss = F.cross_entropy(model(inputs).reshape(-1, V), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    gen = torch.Generator().manual_seed(1)
    batches = [periodic_batch(gen, 8) for _ in range(2)]
    return model, batches


@torch.no_grad()
def explicit_loss(model, batches, budgets):
    """Mean loss with one SelectiveKVCache per layer, token by token (independent of pruning.py)."""
    losses = []
    for inputs, targets in batches:
        caches = [selattn_ext.SelectiveKVCache(inputs.shape[0], a.num_kv_heads, a.head_dim, b)
                  for a, b in zip(model.attns, budgets)]
        logits = model(inputs, caches)
        losses.append(F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)).item())
    return sum(losses) / len(losses)


@torch.no_grad()
def unpruned_loss(model, batches):
    return sum(F.cross_entropy(model(i).reshape(-1, V), t.reshape(-1)).item()
               for i, t in batches) / len(batches)


def test_model_needs_context(trained):
    """The premise: the model learned the task, and one kept token per layer ruins it."""
    model, batches = trained
    base = unpruned_loss(model, batches)
    assert base < 0.5 * torch.log(torch.tensor(float(V))).item()
    assert explicit_loss(model, batches, [1, 1]) > 1.1 * base


@pytest.mark.parametrize("tolerance", [0.01, 0.05])
def test_budgets_keep_loss_within_tolerance(trained, tolerance):
    model, batches = trained
    budgets = pruning.calibrate_budgets(model, batches, tolerance=tolerance)
    assert len(budgets) == 2 and all(isinstance(b, int) and 1 <= b <= N for b in budgets)
    base = unpruned_loss(model, batches)
    assert explicit_loss(model, batches, budgets) <= base * (1 + tolerance) + 1e-6
    # It really prunes: less than the whole sequence in total, and more than the useless minimum.
    assert sum(budgets) < 2 * N
    assert max(budgets) > 1


def test_pruned_loss_matches_explicit_caches(trained):
    model, batches = trained
    for budgets in ([5, 12], [N, 3], [1, N + 7]):
        assert pruning.pruned_loss(model, batches, budgets) == pytest.approx(
            explicit_loss(model, batches, budgets), rel=1e-5, abs=1e-6)
    assert pruning.pruned_loss(model, batches, N) == pytest.approx(unpruned_loss(model, batches),
                                                                   rel=1e-5)


def test_tighter_tolerance_never_gives_smaller_budgets(trained):
    model, batches = trained
    previous = None
    for tolerance in (0.0, 0.003, 0.02, 0.1, 1.0):
        budgets = pruning.calibrate_budgets(model, batches, tolerance=tolerance)
        if previous is not None:
            assert all(b <= p for b, p in zip(budgets, previous)), (tolerance, budgets, previous)
        previous = budgets
    assert previous != [N, N]  # 100% tolerance allows pruning something


def test_path_is_monotone_and_stops_after_exceeding(trained):
    model, batches = trained
    path = pruning.calibration_path(model, batches, tolerance=0.02)
    assert path.steps[0] == ([N, N], path.base_loss)
    ladder = pruning.budget_ladder(N)
    for (prev, _), (cur, _) in zip(path.steps, path.steps[1:]):
        assert all(c <= p for c, p in zip(cur, prev)) and cur != prev
        for c, p in zip(cur, prev):  # one rung at most
            assert c == p or ladder.index(c) == ladder.index(p) + 1
    limit = path.base_loss * 1.02
    assert all(loss <= limit for _, loss in path.steps[:-1])
    assert path.budgets_for(0.02) == pruning.calibrate_budgets(model, batches, tolerance=0.02)


def test_budget_ladder():
    assert pruning.budget_ladder(512) == [512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8,
                                          6, 4, 3, 2, 1]
    assert pruning.budget_ladder(40, 5) == [40, 32, 24, 16, 12, 8, 6, 5]
    with pytest.raises(ValueError, match="min_budget"):
        pruning.budget_ladder(8, 9)


def test_min_and_max_budget(trained):
    model, batches = trained
    budgets = pruning.calibrate_budgets(model, batches, tolerance=1.0, min_budget=6)
    assert min(budgets) >= 6
    budgets = pruning.calibrate_budgets(model, batches, tolerance=0.0, max_budget=24)
    assert max(budgets) <= 24


def test_bad_arguments(trained):
    model, batches = trained
    with pytest.raises(ValueError, match="tolerance"):
        pruning.calibrate_budgets(model, batches, tolerance=-0.1)
    with pytest.raises(ValueError, match="empty"):
        pruning.calibrate_budgets(model, [], tolerance=0.01)
    with pytest.raises(ValueError, match="SelectiveSelfAttention"):
        pruning.calibrate_budgets(nn.Linear(3, 3), batches)
    with pytest.raises(ValueError, match="one per layer"):
        pruning.pruned_loss(model, batches, [4, 4, 4])
    with pytest.raises(TypeError, match="loss_fn"):
        pruning.calibrate_budgets(model, ["not a batch"])


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed")
def test_hf_selective_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    from selattn_ext.integrations.transformers import SelectivePrunedCache, register

    register()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=V + 1,
                         bos_token_id=BOS)
    config._attn_implementation = "selective"
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        ids = periodic_batch(gen)[0]
        loss = model(ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    batches = [periodic_batch(gen, 8)[0] for _ in range(2)]
    budgets = pruning.calibrate_budgets(model, batches, tolerance=0.02)
    assert len(budgets) == 2 and max(budgets) <= N
    kw = ("cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
          else "past_key_values")
    with torch.no_grad():
        base = sum(model(ids, labels=ids, use_cache=False).loss.item() for ids in batches) / 2
        pruned = sum(model(ids, labels=ids, use_cache=True,
                           **{kw: SelectivePrunedCache(budget=budgets, prefill_chunk=1)}).loss.item()
                     for ids in batches) / 2
    assert pruned <= base * 1.02 + 1e-6
    assert pruning.pruned_loss(model, batches, budgets) == pytest.approx(pruned, rel=1e-6)
