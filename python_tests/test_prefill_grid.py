"""selattn_ext.attention against the eager reference on a covering design of the grid
B x N x D x (Hq, Hkv) x sel_head x layout x selection inputs x dtype (DESIGN §1, §7)."""

import itertools

import pytest

from prefill_cases import (GRID_AXES, GRID_PAIRS, case_axis_value, check_against_reference,
                           grid_cases)

CASES = grid_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_matches_reference(case, device):
    check_against_reference(case, device, grads=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradients_match_reference(case, device):
    check_against_reference(case, device, grads=True)


def test_grid_covers_every_value_and_pair():
    for axis, values in GRID_AXES.items():
        seen = {repr(case_axis_value(c, axis)) for c in CASES}
        want = {repr(v) for v in values}
        assert seen == want, f"axis {axis}: missing {want - seen}"
    for a, b in GRID_PAIRS:
        seen = {(repr(case_axis_value(c, a)), repr(case_axis_value(c, b))) for c in CASES}
        want = {(repr(x), repr(y)) for x, y in itertools.product(GRID_AXES[a], GRID_AXES[b])}
        assert seen == want, f"pair {a} x {b}: missing {sorted(want - seen)[:5]}"
