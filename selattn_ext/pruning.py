"""Per-layer budgets for the pruned KV cache: how few tokens each layer may keep.

The paper (Leviathan et al., §"context pruning") gives every layer its own budget, found by a
greedy search on held-out data, so that the loss through the pruned cache stays within a small
relative tolerance (1%) of the unpruned loss. :func:`calibrate_budgets` does that search for a
model built from :class:`selattn_ext.nn.SelectiveSelfAttention` modules or a Hugging Face model
using ``attn_implementation="selective"``; the result is a list with one budget per layer, for
``SelectivePrunedCache(budget=...)`` or one ``SelectiveKVCache(budget=...)`` per layer.

    budgets = calibrate_budgets(model, batches, tolerance=0.01)

The search walks one path from "every layer keeps the whole sequence" downwards. Each step
lowers either one layer or all layers together by one rung of a ladder of budgets (powers of
two and 1.5 x powers of two: ..., 32, 48, 64, 96, 128, ...), choosing the move that costs the
least loss per token of memory saved; while lowering every layer at once costs at most 0.1% of
the unpruned loss it takes that move without trying single layers (an early, nearly free
stretch where one evaluation per rung is enough). The path does not depend on the tolerance:
the tolerance only decides where to stop (before the first step whose loss exceeds it). So a
tighter tolerance stops earlier on the same path and never gives a smaller budget for any
layer, and the returned budgets are a point whose loss was measured within the tolerance.

Cost: one pruned evaluation of ``batches`` per candidate, at most ``layers + 1`` candidates per
step. Pruned evaluation decodes token by token (that is what the budget means: each query sees
at most ``budget`` kept tokens plus itself), so keep the calibration batches small.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import SelectiveKVCache
from .nn import SelectiveSelfAttention

__all__ = ["CalibrationPath", "budget_ladder", "calibrate_budgets", "calibration_path",
           "pruned_loss"]

LossFn = Callable[[nn.Module, Any], Tensor]

# While lowering every layer by one rung keeps the loss within this fraction of the unpruned
# loss, the search takes that move without evaluating single-layer moves. A constant, not the
# tolerance: the path must not depend on the tolerance (see the module docstring).
_FREE_RELATIVE = 1e-3


@dataclass
class CalibrationPath:
    """The search's path: ``steps[t] = (budgets, loss)``, ``steps[0]`` being the unpruned
    model (every layer at ``max_budget``, loss ``base_loss``). Budgets only decrease along the
    path. The last step may exceed the tolerance it was computed for (the search stops there)."""

    base_loss: float
    max_budget: int
    steps: List[Tuple[List[int], float]] = field(default_factory=list)
    evaluations: int = 0

    def limit(self, tolerance: float) -> float:
        return self.base_loss + tolerance * abs(self.base_loss)

    def budgets_for(self, tolerance: float) -> List[int]:
        """The budgets of the last step before the first one whose loss exceeds
        ``base_loss * (1 + tolerance)``: the calibrated budgets for that tolerance."""
        _check_tolerance(tolerance)
        limit = self.limit(tolerance)
        chosen = self.steps[0][0]
        for budgets, loss in self.steps[1:]:
            if loss > limit:
                break
            chosen = budgets
        return list(chosen)


def _check_tolerance(tolerance: float) -> None:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
            or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")


def budget_ladder(max_budget: int, min_budget: int = 1) -> List[int]:
    """Descending budgets the search may use: ``max_budget``, then every power of two and 1.5 x
    power of two below it, down to ``min_budget`` (included)."""
    for name, v in (("max_budget", max_budget), ("min_budget", min_budget)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if min_budget > max_budget:
        raise ValueError(f"min_budget ({min_budget}) must be <= max_budget ({max_budget})")
    rungs = {max_budget, min_budget}
    p = 1
    while p < max_budget:
        for r in (p, 3 * p // 2):
            if min_budget <= r < max_budget:
                rungs.add(r)
        p *= 2
    return sorted(rungs, reverse=True)


# --------------------------------------------------------------------------------------------
# Running a model through the pruned cache
# --------------------------------------------------------------------------------------------

def _is_hf_selective(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "selective"


def _selective_modules(model: nn.Module) -> List[SelectiveSelfAttention]:
    return [m for m in model.modules() if isinstance(m, SelectiveSelfAttention) and m.selective]


def _num_layers(model: nn.Module) -> int:
    if _is_hf_selective(model):
        return int(model.config.num_hidden_layers)
    mods = _selective_modules(model)
    if not mods:
        raise ValueError(
            "calibrate_budgets needs a model with selattn_ext.nn.SelectiveSelfAttention modules "
            "(selective=True) or a Hugging Face model with attn_implementation='selective'; "
            f"found neither in {type(model).__name__}")
    return len(mods)


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """The loss of one batch: ``(inputs, targets)`` -> cross-entropy of ``model(inputs)``
    against targets; a dict -> ``model(**batch).loss`` (Hugging Face, with ``labels``); a token
    tensor (B, N) -> ``model(input_ids=batch, labels=batch).loss`` for a Hugging Face model,
    else the next-token cross-entropy of ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch).loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    if isinstance(batch, Tensor):
        if _is_hf_selective(model):
            return model(input_ids=batch, labels=batch).loss
        logits = model(batch)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               batch[:, 1:].reshape(-1))
    raise TypeError(f"batches must hold (inputs, targets) pairs, dicts or token tensors (or pass "
                    f"loss_fn=), got {type(batch).__name__}")


def _hf_cache_kwarg(model: nn.Module) -> str:
    # transformers renamed the forward argument past_key_values to cache during 5.x.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextmanager
def _pruned(model: nn.Module, budgets: Optional[Sequence[int]],
            seen_lengths: Optional[List[int]] = None) -> Iterator[None]:
    """Within the block, every forward of ``model`` runs through a fresh pruned cache per layer
    with these budgets (None: unpruned). Records sequence lengths in ``seen_lengths``."""
    handles = []
    try:
        if _is_hf_selective(model):
            from .integrations.transformers import SelectivePrunedCache

            kw = _hf_cache_kwarg(model)

            def hf_hook(module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if ids is None:
                    ids = kwargs.get("inputs_embeds")
                if seen_lengths is not None and ids is not None:
                    seen_lengths.append(int(ids.shape[1]))
                if budgets is None:
                    return args, kwargs
                # prefill_chunk=1: every token is its own decode step, as in generation.
                kwargs = dict(kwargs, use_cache=True)
                kwargs[kw] = SelectivePrunedCache(budget=list(budgets), prefill_chunk=1)
                return args, kwargs

            handles.append(model.register_forward_pre_hook(hf_hook, with_kwargs=True))
        else:
            mods = _selective_modules(model)
            for idx, mod in enumerate(mods):
                budget = None if budgets is None else int(budgets[idx])

                def nn_hook(module, args, kwargs, budget=budget):
                    x = args[0] if args else kwargs["x"]
                    given = args[1] if len(args) > 1 else kwargs.get("cache")
                    if given is not None or kwargs.get("cu_seqlens") is not None:
                        raise ValueError("calibrate_budgets runs every layer through its own "
                                         "pruned cache: the model's forward must not pass a cache "
                                         "or packed sequences (cu_seqlens) to its attention")
                    if seen_lengths is not None:
                        seen_lengths.append(int(x.shape[1]))
                    if budget is None or budget >= x.shape[1]:
                        return args, kwargs  # nothing to evict: the fused prefill is the same
                    cache = SelectiveKVCache(x.shape[0], module.num_kv_heads, module.head_dim,
                                             budget, max_chunk=1, dtype=x.dtype, device=x.device)
                    kwargs = {k: v for k, v in kwargs.items() if k != "x"}
                    kwargs["cache"] = cache
                    return (x,), kwargs

                handles.append(mod.register_forward_pre_hook(nn_hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: Sequence[Any], budgets: Optional[Sequence[int]],
               loss_fn: LossFn, seen_lengths: Optional[List[int]] = None) -> float:
    was_training = model.training
    model.eval()
    try:
        with _pruned(model, budgets, seen_lengths):
            losses = [float(loss_fn(model, b)) for b in batches]
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("batches is empty")
    return sum(losses) / len(losses)


def _as_budget_list(model: nn.Module, budgets) -> List[int]:
    layers = _num_layers(model)
    if isinstance(budgets, int) and not isinstance(budgets, bool):
        budgets = [budgets] * layers
    budgets = list(budgets)
    if len(budgets) != layers or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                     for b in budgets):
        raise ValueError(f"budgets must be a positive int or {layers} positive ints (one per "
                         f"layer), got {budgets!r}")
    return budgets


def pruned_loss(model: nn.Module, batches: Iterable[Any], budgets, *,
                loss_fn: Optional[LossFn] = None) -> float:
    """Mean loss over ``batches`` with every layer decoding token by token through a pruned
    cache of its budget (an int for all layers, or one per layer; a budget >= the sequence
    length runs that layer unpruned, which decoding reproduces up to rounding)."""
    batches = list(batches)
    return _mean_loss(model, batches, _as_budget_list(model, budgets), loss_fn or default_loss)


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------

def calibration_path(model: nn.Module, batches: Iterable[Any], *, tolerance: float = 0.01,
                     loss_fn: Optional[LossFn] = None, min_budget: int = 1,
                     max_budget: Optional[int] = None,
                     progress: Optional[Callable[[str], None]] = None) -> CalibrationPath:
    """The greedy path of :func:`calibrate_budgets`, followed until the first step whose loss
    exceeds ``tolerance`` (or every layer is at ``min_budget``). One path serves every smaller
    tolerance: ``path.budgets_for(t)`` for ``t <= tolerance``."""
    _check_tolerance(tolerance)
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: calibration needs at least one batch")
    loss_fn = loss_fn or default_loss
    layers = _num_layers(model)
    seen: List[int] = []
    base = _mean_loss(model, batches, None, loss_fn, seen)
    if not math.isfinite(base):
        raise ValueError(f"the unpruned loss on the calibration batches is {base}")
    if max_budget is None:
        if not seen:
            raise ValueError("could not see the sequence length (no selective layer ran); "
                             "pass max_budget=")
        max_budget = max(seen)
    ladder = budget_ladder(max_budget, min(min_budget, max_budget))
    down = {hi: lo for hi, lo in zip(ladder, ladder[1:])}
    path = CalibrationPath(base_loss=base, max_budget=max_budget)
    current, current_loss = [max_budget] * layers, base
    path.steps.append((list(current), base))
    limit = path.limit(tolerance)
    free = base + _FREE_RELATIVE * abs(base)

    def evaluate(budgets: List[int]) -> float:
        path.evaluations += 1
        return _mean_loss(model, batches, budgets, loss_fn)

    while True:
        movable = [i for i, b in enumerate(current) if b in down]
        if not movable:
            break
        candidates: List[Tuple[float, int, List[int], float]] = []  # (score, order, budgets, loss)
        if len(movable) > 1:
            everyone = [down.get(b, b) for b in current]
            loss = evaluate(everyone)
            if loss <= free:  # the nearly free stretch: one evaluation per rung
                current, current_loss = everyone, loss
                path.steps.append((list(current), loss))
                if progress:
                    progress(f"all layers -> {current}: {loss:.5f}")
                if loss > limit:
                    break
                continue
            saved = sum(current) - sum(everyone)
            candidates.append(((loss - current_loss) / saved, -1, everyone, loss))
        for i in movable:
            one = list(current)
            one[i] = down[current[i]]
            loss = evaluate(one)
            candidates.append(((loss - current_loss) / (current[i] - one[i]), i, one, loss))
        # Cheapest loss per token saved; ties: the all-layer move, then the lowest layer.
        _, _, current, current_loss = min(candidates, key=lambda c: (c[0], c[1]))
        path.steps.append((list(current), current_loss))
        if progress:
            progress(f"{current}: {current_loss:.5f}")
        if current_loss > limit:
            break
    return path


def calibrate_budgets(model: nn.Module, batches: Iterable[Any], *, tolerance: float = 0.01,
                      loss_fn: Optional[LossFn] = None, min_budget: int = 1,
                      max_budget: Optional[int] = None) -> List[int]:
    """Per-layer budgets that keep the loss through the pruned cache within ``tolerance``
    (relative) of the unpruned loss on ``batches``, with as little total cache as the greedy
    search finds (see the module docstring).

    Args:
        model: built from ``selattn_ext.nn.SelectiveSelfAttention`` modules (layers in module
            order; its forward must not pass caches itself), or a Hugging Face model with
            ``attn_implementation="selective"`` (layers in model order).
        batches: held-out batches (iterated several times): ``(inputs, targets)`` pairs, dicts
            of Hugging Face inputs with ``labels``, or token tensors; see ``loss_fn``. Every
            sequence starts at position 0 (its BOS).
        tolerance: relative loss increase allowed, e.g. 0.01 for 1%.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default :func:`default_loss`.
        min_budget: smallest budget tried for any layer.
        max_budget: the budget meaning "unpruned"; default the longest sequence seen.

    Returns:
        One budget per layer, usable as ``SelectivePrunedCache(budget=budgets)``. Loss at these
        budgets on ``batches`` was measured within the tolerance; on other data it may not be.
    """
    path = calibration_path(model, batches, tolerance=tolerance, loss_fn=loss_fn,
                            min_budget=min_budget, max_budget=max_budget)
    return path.budgets_for(tolerance)
