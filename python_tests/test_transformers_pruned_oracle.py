"""Pruned generation through ``SelectivePrunedCache`` with eviction, step by step against an
oracle: the same model whose attention runs ``selattn_ext.reference.ReferenceKVCache`` (the
literal loop of DESIGN §3) per layer, fed the same chunks. Logits compared in float64.

The oracle runs the model without a transformers cache: each forward gets only the new tokens
(with their absolute ``position_ids`` for RoPE), and the attention function keeps the pruned
state itself, keyed by ``module.layer_idx``.
"""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface  # noqa: E402

from selattn_ext.integrations.transformers import SelectivePrunedCache  # noqa: E402
from selattn_ext.reference import ReferenceKVCache  # noqa: E402

from test_transformers import forward_step, generate, make_model, prompt  # noqa: E402

ORACLE_IMPL = "selective_pruned_oracle"


class PrunedOracle:
    """Per-layer ReferenceKVCache, fed ``prefill_chunk`` tokens at a time (as the real cache)."""

    active = None  # the oracle the registered attention function delegates to

    def __init__(self, budget, tau, prefill_chunk):
        self.budget, self.tau, self.chunk = budget, tau, prefill_chunk
        self.layers = {}

    def attend(self, module, query, key, value, scaling):
        ref = self.layers.setdefault(
            module.layer_idx, ReferenceKVCache(self.budget, tau=self.tau, scale=scaling))
        outs = [ref.step(query[:, :, i:i + self.chunk], key[:, :, i:i + self.chunk],
                         value[:, :, i:i + self.chunk])
                for i in range(0, query.shape[2], self.chunk)]
        return torch.cat(outs, dim=2)

    def forward(self, model, ids, start):
        """Logits of ``ids`` (B, n), the tokens at positions start .. start + n - 1."""
        position_ids = torch.arange(start, start + ids.shape[1])[None].expand(ids.shape[0], -1)
        model.set_attn_implementation(ORACLE_IMPL)
        PrunedOracle.active = self
        try:
            return model(ids, position_ids=position_ids, use_cache=False).logits
        finally:
            PrunedOracle.active = None
            model.set_attn_implementation("selective")

    def positions(self):
        return [self.layers[i].positions() for i in sorted(self.layers)]


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      **kwargs):
    assert attention_mask is None and query.shape[2] == key.shape[2]
    out = PrunedOracle.active.attend(module, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ORACLE_IMPL, _oracle_attention)


# The last case gives every attention layer a non-default scaling (as models with a
# query_pre_attn_scalar do), which the integration must pass on to prefill and decode.
@pytest.mark.parametrize("prefill_chunk,tau,scaling", [(1, None, None), (4, None, None),
                                                       (3, 1.5, None), (2, None, 0.45)])
def test_pruned_generation_matches_reference_cache_oracle(prefill_chunk, tau, scaling):
    model = make_model(torch.float64)
    if scaling is not None:
        for layer in model.model.layers:
            assert layer.self_attn.scaling != scaling
            layer.self_attn.scaling = scaling
    ids = prompt(n=11, seed=7)
    budget, new = 5, 9
    with torch.no_grad():
        cache = SelectivePrunedCache(budget=budget, tau=tau, prefill_chunk=prefill_chunk)
        gen = generate(model, ids, cache, max_new_tokens=new, output_logits=True,
                       return_dict_in_generate=True)
    total = ids.shape[1] + new - 1  # the last generated token is never fed back
    seq = gen.sequences[:, :total]

    # Teacher forced over the generated sequence: the prompt in one forward, then one token
    # per forward; after every forward the logits and every layer's kept positions agree.
    ours_cache = SelectivePrunedCache(budget=budget, tau=tau, prefill_chunk=prefill_chunk)
    oracle = PrunedOracle(budget, tau, prefill_chunk)
    feeds = [(0, ids.shape[1])] + [(t, t + 1) for t in range(ids.shape[1], total)]
    last_logits, kept_sizes = [], []
    with torch.no_grad():
        for s, e in feeds:
            ours = forward_step(model, seq[:, s:e], ours_cache)
            want = oracle.forward(model, seq[:, s:e], s)
            assert ours.dtype == torch.float64
            torch.testing.assert_close(ours, want, rtol=0, atol=1e-10,
                                       msg=lambda m: f"tokens {s}..{e - 1}: {m}")
            assert ours_cache.positions() == oracle.positions(), f"tokens {s}..{e - 1}"
            last_logits.append(want[:, -1])
            kept_sizes.append([len(kept) for layer in oracle.positions() for kept in layer])
        full = model(seq, use_cache=False).logits  # unpruned, for the sanity check below

    # generate() through the real cache produced the oracle's logits and its greedy tokens.
    oracle_logits = torch.stack(last_logits, dim=1)
    torch.testing.assert_close(torch.stack(gen.logits, dim=1).double(), oracle_logits,
                               rtol=0, atol=1e-5)
    assert torch.equal(gen.sequences[:, ids.shape[1]:], oracle_logits.argmax(-1))
    # Eviction really happened (in the prompt already when the chunk is small) and changed
    # the logits, so the comparison above covers pruned states.
    assert max(kept_sizes[0]) <= budget < ids.shape[1]
    assert all(size <= budget for sizes in kept_sizes for size in sizes)
    assert (oracle_logits - full[:, ids.shape[1] - 1:]).abs().max() > 1e-3
    if tau is not None:  # the threshold, not only the budget, evicted
        assert min(min(sizes) for sizes in kept_sizes) < budget
