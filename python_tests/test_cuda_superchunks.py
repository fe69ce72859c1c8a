"""The CUDA prefill's bounded workspace (DESIGN §4, issue 12 item 1): query blocks in
superchunks with a carried column sum, so the Poff workspace stays within max(size of q, 64 MiB).

The size functions are the real host code of csrc/cuda/prefill (launch.cu, dispatch.h), called
through the CPU execution target's C ABI, so they are checked here for N up to 1M without a GPU;
the superchunked launchers run on the emulated kernels (tools/cuda_emulation) against the fp64
reference and against the same call in one superchunk.
"""

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "cuda_emulation"))

import cases  # noqa: E402
import emulated  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the emulation needs Linux/g++")

MIB = 1 << 20
ES = {torch.float32: 4, torch.float64: 8, torch.bfloat16: 2, torch.float16: 2}


@pytest.fixture(scope="module")
def emu():
    return emulated.load()


def _a256(x):
    return (x + 255) // 256 * 256


@pytest.mark.parametrize("n", [1, 31, 33, 1000, 4096, 65536, 131072, 300_000, 1 << 20])
@pytest.mark.parametrize("b,hq,hkv,d,dtype", [
    (1, 32, 8, 128, torch.bfloat16),
    (8, 8, 8, 64, torch.float16),
    (1, 1, 1, 32, torch.float32),
    (2, 4, 2, 7, torch.float64),
    (1, 1, 1, 1, torch.float32),  # q smaller than two Poff rows: the 64 MiB floor decides
])
def test_workspace_size_bounded(emu, monkeypatch, n, b, hq, hkv, d, dtype):
    monkeypatch.delenv("SELATTN_CUDA_SUPERCHUNK_BLOCKS", raising=False)
    acc = 8 if dtype == torch.float64 else 4
    q_bytes = b * hq * n * d * ES[dtype]
    cap = max(q_bytes, 64 * MIB)
    nqb = math.ceil(n / 32)
    blocks = emu.prefill_superchunk_blocks(b, hq, hkv, n, d, dtype)
    # The rule of dispatch.h: as many 32-row blocks as fit under the cap, a multiple of 4 (a
    # 128-row forward tile never straddles two superchunks), at least 4, at most all of them.
    assert blocks == min(nqb, max(4, (cap // (b * n * acc)) & ~3))
    assert blocks % 4 == 0 or blocks == nqb
    poff = _a256(b * blocks * n * acc)
    assert poff <= _a256(max(cap, 4 * b * n * acc))
    carry = _a256(b * n * 8)  # fp64 whatever the dtype
    fwd = emu.prefill_workspace_bytes(False, b, hq, hkv, n, d, dtype)
    assert fwd == poff + carry
    bn = b * n
    bwd = emu.prefill_workspace_bytes(True, b, hq, hkv, n, d, dtype)
    # Poff, carry, then O(N) per head: Dl, the fp32/fp64 gradient accumulators, dF suffixes.
    assert bwd == (poff + carry + _a256(bn * hq * acc) + _a256(bn * hq * d * acc) +
                   2 * _a256(bn * hkv * d * acc) + 2 * _a256(bn * d * acc) + _a256(bn * hq * acc))
    # Against the unbounded Poff of before (B * ceil(N/32) * N): never more, and at long N
    # an order of magnitude less (N = 1M, B = 1, Hq = 32, D = 128: 8 GiB, the size of q,
    # instead of 128 GiB).
    assert poff <= _a256(b * nqb * n * acc)
    if n == 1 << 20 and d >= 32:
        assert fwd <= max(q_bytes, 64 * MIB) + carry < b * nqb * n * acc / 10


def test_one_superchunk_up_to_64k_for_llama_like_heads(emu, monkeypatch):
    """B = 1, Hq = 32, D = 128, bf16: N <= 64K keeps all blocks in one superchunk (no carry
    pass), 128K needs two."""
    monkeypatch.delenv("SELATTN_CUDA_SUPERCHUNK_BLOCKS", raising=False)
    for n, count in ((4096, 1), (65536, 1), (131072, 2), (1 << 20, 16)):
        blocks = emu.prefill_superchunk_blocks(1, 32, 8, n, 128, torch.bfloat16)
        assert math.ceil(math.ceil(n / 32) / blocks) == count


def test_env_forces_blocks_in_fours(emu, monkeypatch):
    for env, want in (("1", 4), ("2", 4), ("4", 4), ("7", 4), ("8", 5), ("1000", 5)):
        monkeypatch.setenv("SELATTN_CUDA_SUPERCHUNK_BLOCKS", env)
        assert emu.prefill_superchunk_blocks(1, 2, 1, 150, 64, torch.bfloat16) == want


@pytest.mark.parametrize("case", cases.superchunk_cases()[:4],
                         ids=lambda c: f"{c.path}-{cases.NAMES[c.dtype]}-d{c.head_dim}-"
                                       f"n{c.seqlen}-sc{c.superchunk_blocks}")
def test_superchunks_match_reference(emu, case):
    records = cases.check_prefill(emu, case)
    bad = [r for r in records if not r["passed"]]
    assert not bad, bad


@pytest.mark.parametrize("path,dtype,d", [("tc", torch.bfloat16, 64),
                                          ("simt", torch.float32, 40)])
def test_superchunks_agree_with_one_superchunk(emu, path, dtype, d):
    """The forward adds the carry in the same order as one superchunk does: identical bits.
    The backward's lower superchunks retreat the carry by subtraction: last-bit differences."""
    c = cases.PrefillCase(dtype, d, batch=2, seqlen=150, heads_q=2, heads_kv=1, sel_head=1,
                          path=path, seed=40)
    (q, k, v, qs, ks, dout), _, _ = cases._inputs(c)
    scale = d ** -0.5
    runs = {}
    for blocks in (None, 4):
        with cases.superchunk_env(blocks):
            out, lse = emu.prefill_fwd(q, k, v, qs, ks, scale, path=path)
            grads = emu.prefill_bwd(dout, q, k, v, qs, ks, out, lse, None, scale, path=path)
        runs[blocks] = (out, lse, grads)
    assert torch.equal(runs[None][0], runs[4][0]) and torch.equal(runs[None][1], runs[4][1])
    for name, g1, g2 in zip(("dq", "dk", "dv", "dq_sel", "dk_sel"), runs[None][2], runs[4][2]):
        mag = g1.double().abs().max().item()
        err = (g1.double() - g2.double()).abs().max().item()
        # bf16 outputs: a last-bit flip of the rounded gradient is 2^-8 relative.
        tol = (2.0 ** -7 if dtype == torch.bfloat16 else 1e-5) * mag
        assert err <= tol, f"{name}: superchunks differ by {err:.3g} (max {mag:.3g})"
