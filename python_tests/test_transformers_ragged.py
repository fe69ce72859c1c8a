"""HF transformers with ragged batches (DESIGN §1.1): packed training, left-padded batched
generation through SelectivePrunedCache and without a cache, beam search.

Every check compares against the same documents / prompts run alone (fp64 tiny Llama whose F
is non-trivial, see test_transformers.make_model).
"""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DataCollatorWithFlattening  # noqa: E402

from selattn_ext.integrations.transformers import SelectivePrunedCache, register  # noqa: E402
from test_transformers import CACHE_KW, VOCAB, make_model  # noqa: E402

register()
PAD = 0


def docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        d = torch.randint(3, VOCAB, (n,), generator=g)
        d[0] = 1  # each document starts with its BOS
        out.append(d)
    return out


def left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    return ids, mask


def gen(model, ids, mask, cache=None, **kw):
    extra = {CACHE_KW: cache} if cache is not None else {"use_cache": False}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                              output_logits=True, return_dict_in_generate=True, **extra, **kw)


# ------------------------------------------------------------------------------------------
# packed training
# ------------------------------------------------------------------------------------------

def one_by_one_loss_and_grads(model, documents):
    """The packed loss (mean over all predicted tokens) computed document by document."""
    model.zero_grad()
    n_pred = sum(len(d) - 1 for d in documents)
    total = 0.0
    for d in documents:
        if len(d) < 2:  # nothing to predict (and its loss would be 0 / 0)
            continue
        loss = model(d[None], labels=d[None], use_cache=False).loss * ((len(d) - 1) / n_pred)
        loss.backward()
        total += loss.detach()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def packed_loss_and_grads(model, batch, **kw):
    model.zero_grad()
    loss = model(**batch, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("flash_kwargs, use_cache", [(True, False), (False, False),
                                                     (False, True)],
                         ids=["cu_seq_lens", "position_ids", "position_ids-dynamic-cache"])
def test_packed_training_equals_documents_one_by_one(flash_kwargs, use_cache):
    model = make_model(torch.float64).train()
    documents = docs([5, 9, 1, 3, 140])  # 140 spans two 128-row blocks
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = collator([{"input_ids": d.tolist()} for d in documents])
    assert batch["input_ids"].shape == (1, 158)
    if flash_kwargs:
        assert "cu_seq_lens_q" in batch
    ours_loss, ours = packed_loss_and_grads(model, batch, use_cache=use_cache)
    ref_loss, ref = one_by_one_loss_and_grads(model, documents)
    torch.testing.assert_close(ours_loss, ref_loss, rtol=1e-10, atol=1e-10)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-8, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")
    # the packed batch really differs from one causal sequence
    model.zero_grad()
    plain = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    assert abs(plain.item() - ours_loss.item()) > 1e-6


def test_packed_rows_in_a_batch_of_two():
    """position_ids (2, N) with restarts in both rows: every segment is its own sequence."""
    model = make_model(torch.float64)
    a, b, c, d = docs([6, 4, 7, 3], seed=2)
    ids = torch.stack([torch.cat([a, b]), torch.cat([c, d])])
    pos = torch.stack([torch.cat([torch.arange(6), torch.arange(4)]),
                       torch.cat([torch.arange(7), torch.arange(3)])])
    with torch.no_grad():
        logits = model(ids, position_ids=pos, use_cache=False).logits
        alone = [model(x[None], use_cache=False).logits[0] for x in (a, b, c, d)]
    torch.testing.assert_close(logits[0], torch.cat(alone[:2]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits[1], torch.cat(alone[2:]), rtol=1e-10, atol=1e-10)


def test_packed_position_ids_must_restart_at_zero():
    model = make_model(torch.float64)
    ids = docs([8])[0][None]
    with torch.no_grad(), pytest.raises(ValueError, match="restart at 0"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 5, 6, 7, 8]]), use_cache=True)


def test_padded_forward_equals_rows_alone():
    """A right- and left-padded training batch without a cache: real tokens' logits equal each
    row alone (pads are invisible)."""
    model = make_model(torch.float64)
    a, b = docs([9, 5], seed=4)
    ids = torch.full((3, 9), PAD)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = a, 1
    ids[1, :5], mask[1, :5] = b, 1  # right padded
    ids[2, 4:], mask[2, 4:] = b, 1  # left padded (positions restart at the first real token)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        la = model(a[None], use_cache=False).logits[0]
        lb = model(b[None], use_cache=False).logits[0]
    torch.testing.assert_close(logits[0], la, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits[1, :5], lb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits[2, 4:], lb, rtol=1e-10, atol=1e-10)


def test_pad_between_real_tokens_is_rejected_without_cache():
    model = make_model(torch.float64)
    ids = docs([6])[0][None]
    mask = torch.tensor([[1, 1, 0, 0, 1, 1]])
    with torch.no_grad(), pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=mask, use_cache=False)


# ------------------------------------------------------------------------------------------
# left-padded batched generation
# ------------------------------------------------------------------------------------------

CACHES = [
    pytest.param(dict(budget=64), id="unpruned"),
    pytest.param(dict(budget=6), id="evicting"),
    pytest.param(dict(budget=6, prefill_chunk=1), id="evicting-chunk1"),
    pytest.param(dict(budget=7, prefill_chunk=3, tau=2.0), id="evicting-chunk3-tau"),
    pytest.param(None, id="no-cache"),
]


@pytest.mark.parametrize("cache_kw", CACHES)
def test_left_padded_generation_equals_each_prompt_alone(cache_kw):
    model = make_model(torch.float64)
    prompts = docs([5, 12, 1, 9], seed=7)
    ids, mask = left_pad(prompts)
    new = 8
    cache = SelectivePrunedCache(**cache_kw) if cache_kw is not None else None
    ours = gen(model, ids, mask, cache, max_new_tokens=new)
    for r, p in enumerate(prompts):
        solo_cache = SelectivePrunedCache(**cache_kw) if cache_kw is not None else None
        solo = gen(model, p[None], torch.ones_like(p[None]), solo_cache, max_new_tokens=new)
        assert torch.equal(ours.sequences[r, ids.shape[1]:], solo.sequences[0, len(p):]), r
        for step, (a, b) in enumerate(zip(ours.logits, solo.logits)):
            torch.testing.assert_close(a[r], b[0], rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"row {r} step {step}: {m}")
        if cache is not None:
            # pads never take a slot: each row's kept positions are those of the prompt alone
            assert [layer[r] for layer in cache.positions()] == \
                [layer[0] for layer in solo_cache.positions()]
    if cache is not None and cache_kw["budget"] < 20:
        assert all(len(kept) <= cache_kw["budget"] for layer in cache.positions()
                   for kept in layer)
        assert all(kept[0] == 0 for layer in cache.positions() for kept in layer)


def test_left_padded_teacher_forced_logits_fp64():
    """Prompt in one forward, then one token per forward, through the pruned cache with left
    padding: every real position's logits equal the row alone."""
    model = make_model(torch.float64)
    prompts = docs([3, 10, 6], seed=8)
    ids, mask = left_pad(prompts)
    cont = docs([5, 5, 5], seed=9)
    cache = SelectivePrunedCache(budget=5, prefill_chunk=2)
    with torch.no_grad():
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        steps = [model(ids, attention_mask=mask, position_ids=pos, **{CACHE_KW: cache}).logits]
        for t in range(5):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            tok = torch.stack([c[t] for c in cont])[:, None]
            pos = pos[:, -1:] + 1
            steps.append(model(tok, attention_mask=mask, position_ids=pos,
                               **{CACHE_KW: cache}).logits)
        for r, p in enumerate(prompts):
            solo = SelectivePrunedCache(budget=5, prefill_chunk=2)
            ref = [model(p[None], **{CACHE_KW: solo}).logits[0]]
            for t in range(5):
                ref.append(model(cont[r][t:t + 1][None], **{CACHE_KW: solo}).logits[0])
            torch.testing.assert_close(steps[0][r, ids.shape[1] - len(p):], ref[0],
                                       rtol=1e-10, atol=1e-10)
            for t in range(5):
                torch.testing.assert_close(steps[t + 1][r], ref[t + 1], rtol=1e-10, atol=1e-10)


def test_right_padding_is_rejected_with_a_pruned_cache():
    model = make_model()
    a, b = docs([6, 4])
    ids = torch.stack([a, torch.cat([b, torch.zeros(2, dtype=torch.long)])])
    mask = (torch.arange(6)[None] < torch.tensor([[6], [4]])).long()
    with pytest.raises(ValueError, match="right padding"):
        gen(model, ids, mask, SelectivePrunedCache(budget=8), max_new_tokens=2)


# ------------------------------------------------------------------------------------------
# beam search
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padded", [False, True], ids=["one-prompt", "left-padded-batch"])
def test_beam_search_equals_cache_free_beam_search(padded):
    model = make_model(torch.float64)
    prompts = docs([7, 4] if padded else [7], seed=11)
    ids, mask = left_pad(prompts)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, output_scores=True)
    ours = gen(model, ids, mask, SelectivePrunedCache(budget=64), **kw)
    full = gen(model, ids, mask, None, **kw)
    assert torch.equal(ours.sequences, full.sequences)
    torch.testing.assert_close(ours.sequences_scores, full.sequences_scores, rtol=1e-9,
                               atol=1e-9)


def test_beam_search_with_eviction_stays_within_budget():
    model = make_model(torch.float64)
    ids, mask = left_pad(docs([9, 5], seed=12))
    cache = SelectivePrunedCache(budget=4)
    out = gen(model, ids, mask, cache, num_beams=2, max_new_tokens=6)
    assert out.sequences.shape[0] == 2
    for layer in cache.positions():
        assert len(layer) == 4  # 2 prompts x 2 beams
        assert all(len(kept) <= 4 and kept[0] == 0 for kept in layer)


def test_cache_reorder_moves_whole_rows():
    """reorder_cache permutes every piece of a row's state together."""
    model = make_model(torch.float64)
    ids, mask = left_pad(docs([5, 8, 3], seed=13))
    cache = SelectivePrunedCache(budget=4)
    with torch.no_grad():
        model(ids, attention_mask=mask, **{CACHE_KW: cache})
    before = cache.layers[0].kv_cache
    snap = {n: getattr(before, n).clone() for n in ("k_cache", "v_cache", "f", "pos", "seq_len")}
    perm = torch.tensor([2, 2, 0])
    cache.reorder_cache(perm)
    after = cache.layers[0].kv_cache
    for n, t in snap.items():
        assert torch.equal(getattr(after, n), t[perm]), n
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.layers[0].kv_cache.batch_size == 1
    assert torch.equal(cache.layers[0].kv_cache.pos, snap["pos"][[2]])


def test_mask_function_probes():
    """selective_mask reads the mask pattern with O(N) probes: packed-causal segments become
    cu_seqlens, plain causal None, a padding mask its keep-mask, anything else raises."""
    from transformers.masking_utils import (and_masks, causal_mask_function,
                                            packed_sequence_mask_function,
                                            sliding_window_causal_mask_function)
    from selattn_ext.integrations.transformers import selective_mask

    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    packed = and_masks(causal_mask_function, packed_sequence_mask_function(seg))
    cu = selective_mask(2, 6, 6, mask_function=packed)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 12]
    assert selective_mask(2, 6, 6) is None
    assert selective_mask(2, 6, 6, mask_function=sliding_window_causal_mask_function(8)) is None
    keep = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]).bool()
    assert torch.equal(selective_mask(2, 6, 6, attention_mask=keep), keep)
    with pytest.raises(ValueError, match="sliding window"):
        selective_mask(2, 6, 6, mask_function=sliding_window_causal_mask_function(3))
    with pytest.raises(ValueError, match="bidirectional"):
        selective_mask(2, 6, 6, mask_function=lambda b, h, q, kv: q >= 0)
    with pytest.raises(ValueError, match="padding"):
        selective_mask(2, 6, 6, mask_function=packed, attention_mask=keep)
