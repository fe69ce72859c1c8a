"""Property-based sweep: random small shapes, GQA groupings, selection modes, layouts and
scales, fp64 and fp32, forward and gradients against the reference (same tolerance rule as the
grid)."""

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from prefill_cases import CUDA_HEAD_DIMS, Case, check_against_reference, supported


@st.composite
def cases(draw, device):
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    if device == "cuda":
        d = draw(st.sampled_from(CUDA_HEAD_DIMS[:3]))
    else:
        d = draw(st.integers(1, 48))
    return Case(B=draw(st.integers(1, 2)), Hq=hq, Hkv=hkv, N=draw(st.integers(1, 80)), D=d,
                dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                sel_head=draw(st.integers(-hq, hq - 1)),
                layout=draw(st.sampled_from(["bhnd", "bnhd"])),
                sel=draw(st.sampled_from(["head", "explicit", "view"])),
                lse_loss=draw(st.booleans()),
                scale=draw(st.one_of(st.none(), st.floats(0.05, 1.5))))


def test_random_shapes_match_reference(device):
    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=cases(device))
    def check(case):
        assume(supported(device, case.dtype, case.D))
        check_against_reference(case, device, grads=True)

    check()
