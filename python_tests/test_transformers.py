"""HF transformers integration: attn_implementation="selective" and SelectivePrunedCache.

Small randomly initialised Llama models (no downloads). The q/k projections are drawn large
enough that the selection F is non-trivial (checked: some F entries exceed 1), so a path that
dropped F, or mixed up positions, would fail.
"""

import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402

import selattn_ext  # noqa: E402
from selattn_ext import reference  # noqa: E402
from selattn_ext.integrations.transformers import (  # noqa: E402
    SelectivePrunedCache, register)

register()

# transformers renamed the forward/generate argument `past_key_values` to `cache` in 5.x.
CACHE_KW = ("cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
            else "past_key_values")

VOCAB = 128
_F_MAX = []


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         **kwargs):
    """The eager oracle as an attention function (in the input dtype); records max F."""
    out, f = reference.attention(query, key, value, scale=scaling, return_f=True)
    _F_MAX.append(float(f.detach().max()))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("selective_reference", _reference_attention)


def make_model(dtype=torch.float32, seed=0, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # logit std >= 1 so that F matters
            layer.self_attn.q_proj.weight.normal_(0, 0.2)
            layer.self_attn.k_proj.weight.normal_(0, 0.2)
    model.set_attn_implementation("selective")
    return model.to(dtype).eval()


def prompt(batch=2, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, n), generator=g)
    ids[:, 0] = 1  # BOS
    return ids


def logits_with(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    try:
        return model(ids, use_cache=False, **kw).logits
    finally:
        model.set_attn_implementation("selective")


def generate(model, ids, cache=None, **kw):
    extra = {CACHE_KW: cache} if cache is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              pad_token_id=0, **extra, **kw)


def forward_step(model, ids, cache):
    return model(ids, attention_mask=None, use_cache=True, **{CACHE_KW: cache}).logits


def assert_within_fa_tolerance(ours, low, oracle, factor=2.0):
    err = (ours.double() - oracle).abs().max().item()
    base = (low.double() - oracle).abs().max().item()
    assert err <= factor * base + 1e-5, (err, base)


# ------------------------------------------------------------------------------------------
# import behaviour
# ------------------------------------------------------------------------------------------

def _run_python(code):
    root = os.path.dirname(os.path.dirname(os.path.abspath(selattn_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_import_selattn_ext_does_not_import_transformers():
    _run_python("import sys, selattn_ext; assert 'transformers' not in sys.modules, 'imported'")


def test_missing_transformers_gives_clear_import_error():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n"
            "    import selattn_ext.integrations.transformers\n"
            "except ImportError as e:\n"
            "    assert 'pip install' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no ImportError')\n")
    _run_python(code)


# ------------------------------------------------------------------------------------------
# prefill / training
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_reference_low_precision(dtype):
    model = make_model(dtype)
    ids = prompt(n=24)
    with torch.no_grad():
        ours = model(ids, use_cache=False).logits
        low = logits_with(model, "selective_reference", ids)
        _F_MAX.clear()
        oracle = logits_with(model.double(), "selective_reference", ids)
        plain = logits_with(model, "sdpa", ids)
    assert max(_F_MAX) > 1.0, "F too small for the test to mean anything"
    assert (oracle - plain.double()).abs().max() > 1e-2, "F does not change the outputs"
    assert_within_fa_tolerance(ours, low, oracle)


def test_forward_matches_reference_fp64():
    model = make_model(torch.float64)
    ids = prompt(n=20)
    with torch.no_grad():
        ours = model(ids, use_cache=False).logits
        oracle = logits_with(model, "selective_reference", ids)
    torch.testing.assert_close(ours, oracle, rtol=1e-9, atol=1e-9)


def test_forward_with_default_dynamic_cache_and_plain_causal_4d_mask():
    model = make_model(torch.float64)
    ids = prompt(n=10)
    n = ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(2, 1, n, n)
    with torch.no_grad():
        base = model(ids, use_cache=False).logits
        with_cache = model(ids, use_cache=True).logits  # a fresh DynamicCache: a plain prefill
        with_mask = model(ids, attention_mask=causal, use_cache=False).logits
        ones_2d = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    for other in (with_cache, with_mask, ones_2d):
        torch.testing.assert_close(other, base, rtol=0, atol=1e-12)


def test_training_gradients_match_reference():
    model = make_model(torch.float64).train()
    ids = prompt(n=16)

    def grads(impl):
        model.zero_grad()
        model.set_attn_implementation(impl)
        model(ids, labels=ids, use_cache=False).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()
                if p.grad is not None}

    ours = grads("selective")
    oracle = grads("selective_reference")
    model.set_attn_implementation("selective")
    assert ours.keys() == oracle.keys()
    for i in range(2):  # the selection head's q/k get gradients (also through F)
        assert ours[f"model.layers.{i}.self_attn.q_proj.weight"].abs().max() > 0
        assert ours[f"model.layers.{i}.self_attn.k_proj.weight"].abs().max() > 0
    for name in ours:
        torch.testing.assert_close(ours[name], oracle[name], rtol=1e-7, atol=1e-9, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model(torch.float64).train()
    ids = prompt(n=12)

    def grads():
        model.zero_grad()
        model(ids, labels=ids, use_cache=False).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
        assert model.is_activation_checkpointing
    else:  # older transformers 5.x
        model.gradient_checkpointing_enable({"use_reentrant": False})
        assert model.is_gradient_checkpointing
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_training_step_fp32_updates_and_lowers_loss():
    model = make_model(torch.float32).train()
    ids = prompt(batch=4, n=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_from_pretrained_and_constructor_accept_selective(tmp_path):
    model = make_model(torch.float64)
    ids = prompt(n=8)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="selective",
                                              dtype=torch.float64)
    assert loaded.config._attn_implementation == "selective"
    config = LlamaConfig.from_pretrained(tmp_path)
    config._attn_implementation = "selective"
    built = LlamaForCausalLM(config).to(torch.float64)
    built.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        for other in (loaded, built):
            torch.testing.assert_close(other(ids, use_cache=False).logits, expected,
                                       rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# generation through the pruned cache
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefill_chunk", [1, 5, 128])
def test_greedy_generation_unpruned_equals_no_cache(prefill_chunk):
    model = make_model(torch.float64)
    ids = prompt(n=12)
    new = 10
    with torch.no_grad():
        cache = SelectivePrunedCache(budget=64, prefill_chunk=prefill_chunk)
        ours = generate(model, ids, cache, max_new_tokens=new, output_scores=True,
                        return_dict_in_generate=True)
        full = generate(model, ids, use_cache=False, max_new_tokens=new, output_scores=True,
                        return_dict_in_generate=True)
    assert torch.equal(ours.sequences, full.sequences)
    # generate returns the scores in float32
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(full.scores),
                               rtol=0, atol=1e-6)
    total = ids.shape[1] + new - 1  # the last generated token is never fed back
    assert cache.get_seq_length() == total
    assert cache.positions() == [[list(range(total))] * 2] * 2

    # fp64 logits, teacher forced: prompt in one forward, then one token per forward
    seq = ours.sequences[:, :total]
    with torch.no_grad():
        cache = SelectivePrunedCache(budget=64, prefill_chunk=prefill_chunk)
        steps = [forward_step(model, seq[:, :ids.shape[1]], cache)]
        steps += [forward_step(model, seq[:, t:t + 1], cache) for t in range(ids.shape[1], total)]
        expected = model(seq, use_cache=False).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_logits_match_prefill_within_tolerance(dtype):
    """Teacher-forced token-by-token decode against the fp64 oracle prefill."""
    model = make_model(dtype)
    ids = prompt(n=20, seed=3)
    with torch.no_grad():
        cache = SelectivePrunedCache(budget=64)
        steps = [forward_step(model, ids[:, :4], cache)]  # a 4-token prompt, then one at a time
        steps += [forward_step(model, ids[:, t:t + 1], cache) for t in range(4, ids.shape[1])]
        ours = torch.cat(steps, dim=1)
        low = logits_with(model, "selective_reference", ids)
        oracle = logits_with(model.double(), "selective_reference", ids)
    assert_within_fa_tolerance(ours, low, oracle)


def test_small_budget_keeps_bos_and_stays_within_budget():
    model = make_model(torch.float64)
    ids = prompt(n=12)
    budget = 5
    with torch.no_grad():
        cache = SelectivePrunedCache(budget=budget)
        pruned = generate(model, ids, cache, max_new_tokens=12, output_scores=True,
                          return_dict_in_generate=True)
        full = generate(model, ids, use_cache=False, max_new_tokens=12, output_scores=True,
                        return_dict_in_generate=True)
    total = ids.shape[1] + 12 - 1
    assert cache.get_seq_length() == total  # absolute positions, not the pruned size
    for layer in cache.positions():
        for kept in layer:
            assert len(kept) == budget and kept[0] == 0
            assert kept[-1] == total - 1  # the newest token has F = 0: never evicted at once
            assert all(0 <= p < total for p in kept)
    # pruning really happened end to end: outputs differ from the unpruned model
    assert not torch.allclose(torch.stack(pruned.scores), torch.stack(full.scores))


def test_prompt_in_one_forward_equals_token_by_token_with_prefill_chunk_1():
    model = make_model(torch.float64)
    ids = prompt(n=14, seed=5)
    with torch.no_grad():
        at_once = SelectivePrunedCache(budget=4, prefill_chunk=1)
        last_at_once = forward_step(model, ids, at_once)[:, -1]
        one_by_one = SelectivePrunedCache(budget=4, prefill_chunk=1)
        for t in range(ids.shape[1]):
            last = forward_step(model, ids[:, t:t + 1], one_by_one)[:, -1]
    assert at_once.positions() == one_by_one.positions()
    torch.testing.assert_close(last_at_once, last, rtol=1e-10, atol=1e-10)


def test_memory_stays_constant_once_the_budget_is_full():
    model = make_model(torch.float32)
    ids = prompt(n=30, seed=2)
    with torch.no_grad():
        cache = SelectivePrunedCache(budget=6, prefill_chunk=4)
        forward_step(model, ids[:, :8], cache)
        held = cache.memory_bytes()
        for t in range(8, ids.shape[1]):
            forward_step(model, ids[:, t:t + 1], cache)
    assert cache.memory_bytes() == held
    assert cache.get_seq_length() == ids.shape[1]


def test_per_layer_budgets_and_taus():
    model = make_model(torch.float64, layers=3)
    ids = prompt(n=16)
    with torch.no_grad():
        cache = SelectivePrunedCache(budget=[3, 6, 9], tau=[None, 1e9, None])
        forward_step(model, ids, cache)
    assert [len(layer[0]) for layer in cache.positions()] == [3, 6, 9]
    assert [layer.tau for layer in cache.layers] == [None, 1e9, None]
    for layer in cache.positions():
        assert all(kept[0] == 0 for kept in layer)

    short = SelectivePrunedCache(budget=[4, 4])
    with torch.no_grad(), pytest.raises(ValueError, match="per-layer budget list has 2"):
        forward_step(model, ids, short)


def test_reset_starts_over():
    model = make_model(torch.float64)
    ids = prompt(n=9)
    with torch.no_grad():
        cache = SelectivePrunedCache(budget=4)
        first = forward_step(model, ids, cache)
        cache.reset()
        assert cache.get_seq_length() == 0
        again = forward_step(model, ids, cache)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_right_padded_prompt_is_rejected_for_generation():
    """Left padding works (test_transformers_ragged.py); a right-padded prompt cannot."""
    model = make_model()
    ids = prompt(n=8)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="right padding"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=2,
                           pad_token_id=0, **{CACHE_KW: SelectivePrunedCache(budget=8)})


def test_non_causal_4d_mask_is_rejected():
    model = make_model()
    ids = prompt(n=6)
    n = ids.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(2, 1, n, n).clone()
    mask[0, 0, 4, 1] = False
    with torch.no_grad(), pytest.raises(ValueError, match="plain causal"):
        model(ids, attention_mask=mask, use_cache=False)


def test_sliding_window_is_rejected():
    config = transformers.MistralConfig(hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=VOCAB, sliding_window=3)
    model = transformers.MistralForCausalLM(config)
    model.set_attn_implementation("selective")
    with torch.no_grad(), pytest.raises(ValueError, match="sliding"):
        model(prompt(n=8), use_cache=False)


def test_attention_dropout_and_output_attentions_are_rejected():
    model = make_model().train()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model(prompt(n=6), use_cache=False)
    model.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="cannot return attention weights"):
        model(prompt(n=6), use_cache=False, output_attentions=True)


def test_generation_with_a_plain_dynamic_cache_is_rejected():
    model = make_model()
    with torch.no_grad(), pytest.raises(ValueError, match="SelectivePrunedCache"):
        generate(model, prompt(n=6), max_new_tokens=3)


def test_pruned_cache_with_another_attention_is_rejected():
    model = make_model()
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), pytest.raises(RuntimeError, match="attn_implementation='selective'"):
        forward_step(model, prompt(n=6), SelectivePrunedCache(budget=8))


@pytest.mark.parametrize("budget", [0, -1, [], [4, 0], 2.5, True])
def test_bad_budget_is_rejected(budget):
    with pytest.raises(ValueError, match="budget"):
        SelectivePrunedCache(budget=budget)


@pytest.mark.parametrize("prefill_chunk", [0, -2, 1.5])
def test_bad_prefill_chunk_is_rejected(prefill_chunk):
    with pytest.raises(ValueError, match="prefill_chunk"):
        SelectivePrunedCache(budget=4, prefill_chunk=prefill_chunk)


def test_default_prefill_chunk_is_at_most_the_budget():
    model = make_model(torch.float32)
    with torch.no_grad():
        cache = SelectivePrunedCache(budget=[3, 200])
        forward_step(model, prompt(n=10), cache)
    assert [layer.kv_cache.max_chunk for layer in cache.layers] == [3, 128]


def test_sampling_several_sequences_with_a_fresh_cache():
    model = make_model()
    ids = prompt(batch=1, n=6)
    cache = SelectivePrunedCache(budget=4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             num_return_sequences=3, max_new_tokens=5, pad_token_id=0,
                             **{CACHE_KW: cache})
    assert out.shape == (3, 11)
    assert [[len(kept) for kept in layer] for layer in cache.positions()] == [[4] * 3] * 2


# ------------------------------------------------------------------------------------------
# other Llama-family models that dispatch through AttentionInterface
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_families_forward_and_generate(family):
    config_cls, model_cls = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    torch.manual_seed(0)
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        vocab_size=VOCAB, max_position_embeddings=256, sliding_window=None,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = model_cls(config).to(torch.float64).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0, 0.2)
            layer.self_attn.k_proj.weight.normal_(0, 0.2)
    model.set_attn_implementation("selective")
    ids = prompt(n=10)
    with torch.no_grad():
        ours = model(ids, use_cache=False).logits
        oracle = logits_with(model, "selective_reference", ids)
        torch.testing.assert_close(ours, oracle, rtol=1e-9, atol=1e-9)
        cached = generate(model, ids, SelectivePrunedCache(budget=32), max_new_tokens=5,
                          output_scores=True, return_dict_in_generate=True)
        full = generate(model, ids, use_cache=False, max_new_tokens=5, output_scores=True,
                        return_dict_in_generate=True)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(full.scores),
                               rtol=0, atol=1e-6)  # generate returns float32 scores
