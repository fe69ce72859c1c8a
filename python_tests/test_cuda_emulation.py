"""The CUDA kernels of csrc/cuda, run on the CPU by the host execution target (DESIGN §4.1;
tools/cuda_emulation/emulated.py) and checked against the fp64 reference.

Covered here (CI): each inline-PTX wrapper and shuffle against its definition, the fp16/bf16
conversions bit for bit against torch's, every prefill and decode instantiation once at a
small shape that crosses the tiles, packed ragged (varlen) batches on both prefill paths, the
runtime's own diagnostics, and the planted defects.
The full matrix and the sanitizer builds: `python tools/cuda_emulation/run_all.py`.
"""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "cuda_emulation"))

import cases  # noqa: E402
import emulated  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the emulation needs Linux/g++")


@pytest.fixture(scope="module")
def emu():
    return emulated.load()


# ---- conversions --------------------------------------------------------------------------

def _interesting_floats():
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(20000, generator=g) * torch.logspace(-30, 30, 20000, base=2.0)
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e9,
                          2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26,
                          3.0 * 2.0 ** -25, 6.1e-5, float("inf"), float("-inf"), 3.4e38,
                          1e-40, 1.00048828125, 1.0009765625, 1.00146484375, 1.001953125])
    # Exact ties of both formats: midpoints between neighbours.
    halves = torch.arange(0, 1 << 15, 97, dtype=torch.int32).to(torch.int16).view(torch.float16)
    ties_h = (halves.float()[:-1] + halves.float()[1:]) / 2
    bfs = torch.arange(0, 1 << 15, 89, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    ties_b = (bfs.float()[:-1].double() + bfs.float()[1:].double()).div(2).float()
    return torch.cat([rnd, edges, ties_h, ties_b]).float()


def test_fp16_bf16_conversions_are_bit_exact(emu):
    x = _interesting_floats()
    x = x[torch.isfinite(x) | torch.isinf(x)]
    h, b = emu.convert(x)
    assert torch.equal(h, x.to(torch.float16).view(torch.int16))
    assert torch.equal(b, x.to(torch.bfloat16).view(torch.int16))
    nan_h, nan_b = emu.convert(torch.tensor([float("nan")]))
    assert torch.isnan(nan_h.view(torch.float16)).all() and torch.isnan(nan_b.view(torch.bfloat16)).all()
    allbits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    fh, fb = emu.widen(allbits, allbits)
    ok = ~torch.isnan(allbits.view(torch.float16))
    assert torch.equal(fh[ok], allbits.view(torch.float16).float()[ok])
    ok = ~torch.isnan(allbits.view(torch.bfloat16))
    assert torch.equal(fb[ok], allbits.view(torch.bfloat16).float()[ok])


# ---- inline-PTX wrappers against the PTX ISA tables ----------------------------------------

def _bits(t):
    return t.view(torch.int16).to(torch.int64) & 0xffff


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_matches_the_isa_table(emu, trans):
    tile = torch.arange(32 * 8, dtype=torch.int32).to(torch.int16).view(32, 8)
    regs = emu.ldmatrix(tile, trans)
    val = _bits(tile)
    for lane in range(32):
        for m in range(4):
            if not trans:  # row lane/4 of matrix m, columns 2(lane%4) and +1
                lo, hi = val[8 * m + lane // 4, 2 * (lane % 4)], val[8 * m + lane // 4, 2 * (lane % 4) + 1]
            else:  # column lane/4, rows 2(lane%4) and +1
                lo, hi = val[8 * m + 2 * (lane % 4), lane // 4], val[8 * m + 2 * (lane % 4) + 1, lane // 4]
            assert int(regs[lane, m]) == int(lo) | (int(hi) << 16), (lane, m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_m16n8k16_matches_the_isa_table(emu, dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 8, generator=g).to(dtype)
    c0 = torch.randn(16, 8, generator=g)
    ab, bb = _bits(a), _bits(b)
    frags = torch.zeros(32, 6, dtype=torch.int64)
    cin = torch.zeros(32, 4)
    for lane in range(32):
        gq, t = lane // 4, lane % 4
        # A: a0 (g, 2t..) a1 (g+8, 2t..) a2 (g, 2t+8..) a3 (g+8, 2t+8..); B: b0 (k 2t.., n g),
        # b1 (k 2t+8.., n g); C: c0,c1 (g, 2t..), c2,c3 (g+8, 2t..)
        for r, (row, col) in enumerate(((gq, 2 * t), (gq + 8, 2 * t), (gq, 2 * t + 8),
                                        (gq + 8, 2 * t + 8))):
            frags[lane, r] = ab[row, col] | (ab[row, col + 1] << 16)
        for r, k0 in enumerate((2 * t, 2 * t + 8)):
            frags[lane, 4 + r] = bb[k0, gq] | (bb[k0 + 1, gq] << 16)
        for i in range(4):
            cin[lane, i] = c0[gq + 8 * (i // 2), 2 * t + i % 2]
    d = emu.mma(frags, cin, dtype == torch.bfloat16)
    want = a.double() @ b.double() + c0.double()
    for lane in range(32):
        gq, t = lane // 4, lane % 4
        for i in range(4):
            assert abs(float(d[lane, i]) - float(want[gq + 8 * (i // 2), 2 * t + i % 2])) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b_is_k_by_n", [False, True], ids=["B_as_KT", "B_as_V"])
def test_kernel_addressing_gives_the_matrix_product(emu, dtype, b_is_k_by_n):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 16, generator=g).to(dtype)
    c = emu.gemm(a, b, b_is_k_by_n)
    assert torch.allclose(c.double(), a.double() @ b.double(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("width", [32, 8])
@pytest.mark.parametrize("arg", [1, 3, 5])
def test_shuffles_follow_the_cuda_semantics(emu, arg, width):
    out = emu.shuffles(arg, width)
    for lane in range(32):
        seg = lane - lane % width
        idx = seg + arg % width
        up = lane - arg if lane - arg >= seg else lane
        down = lane + arg if lane + arg < seg + width else lane
        x = lane ^ arg
        xor = x if x - x % width <= seg else lane
        assert out[:, lane].tolist() == [100 + idx, 100 + up, 100 + down, 100 + xor], lane


def test_a_barrier_not_reached_by_every_thread_is_reported(emu):
    rc, reports = emu.divergent_barrier()
    assert any("divergence" in r or "deadlock" in r for r in reports), (rc, reports)


# ---- the kernels against the reference -----------------------------------------------------

def _ids(cs):
    return [f"{c.path}-{cases.NAMES[c.dtype]}-d{c.head_dim}" for c in cs]


@pytest.mark.parametrize("case", cases.ci_prefill_cases(), ids=_ids(cases.ci_prefill_cases()))
def test_prefill_kernels_match_the_reference(emu, case):
    records = cases.check_prefill(emu, case)
    bad = [r for r in records if not r["passed"]]
    assert not bad, bad


_VARLEN_CI = cases.ci_varlen_cases() + cases.superchunk_varlen_cases()[:1]


@pytest.mark.parametrize("case", _VARLEN_CI,
                         ids=[f"{c.path}-{cases.NAMES[c.dtype]}-d{c.head_dim}"
                              + ("-superchunks" if c.superchunk_blocks else "")
                              for c in _VARLEN_CI])
def test_varlen_kernels_match_the_reference_per_sequence(emu, case):
    # Packed ragged batches (cu_seqlens): each sequence against the fp64 reference run alone.
    records = cases.check_varlen(emu, case)
    bad = [r for r in records if not r["passed"]]
    assert not bad, bad


def test_varlen_without_tokens_launches_nothing(emu):
    q = torch.zeros(0, 2, 32)
    k = torch.zeros(0, 1, 32)
    cu = torch.zeros(3, dtype=torch.int32)
    out, lse = emu.prefill_varlen_fwd(q, k, k, q[:, 0], k[:, 0], cu, 0, 0.2, path="simt")
    assert out.shape == (0, 2, 32) and lse.shape == (2, 0)


@pytest.mark.parametrize("case", cases.ci_decode_cases(),
                         ids=[f"{cases.NAMES[c.dtype]}-d{c.head_dim}-c{c.max_chunk}"
                              for c in cases.ci_decode_cases()])
def test_decode_kernels_match_the_reference(emu, case):
    records = cases.check_decode(emu, case)
    assert records[0]["passed"], records


def test_decode_eviction_ties_go_to_the_oldest(emu):
    # Selection logits all negative: F stays 0, so every budget eviction is a tie, which must go
    # to the oldest position other than BOS. (The random schedules above almost never tie.)
    B, Hkv, D, budget, n = 1, 1, 32, 4, 12
    g = torch.Generator().manual_seed(0)
    k = torch.ones(B, Hkv, n, D)
    q = -torch.rand(B, 2, n, D, generator=g) - 0.5
    v = torch.randn(B, Hkv, n, D, generator=g)
    kc = torch.zeros(B, Hkv, budget + 1, D)
    vc = torch.zeros_like(kc)
    f = torch.zeros(B, budget + 1)
    pos = torch.full((B, budget + 1), -1, dtype=torch.int64)
    seq = torch.zeros(B, dtype=torch.int64)
    for t in range(n):
        emu.decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], kc, vc, f, pos,
                        seq, None, D ** -0.5, 0, budget, None)
        kept = sorted(p for p in pos[0].tolist() if p >= 0)
        assert kept == [0] + list(range(max(1, t - budget + 2), t + 1)), (t, kept)
    assert bool((f == 0).all())


@pytest.mark.parametrize("split_cols", [None, 3])
def test_decode_chunk_eviction_ties_go_to_the_oldest(emu, split_cols):
    # Chunks of 5 over a budget of 6: up to 5 evictions a step, taken by the one-pass radix
    # select. F stays 0 (negative selection logits), so they are all ties: the oldest go first,
    # never BOS. (Distinct F through the same select: the chunk cases of cases.py.)
    B, Hkv, D, budget, c = 2, 1, 32, 6, 5
    g = torch.Generator().manual_seed(1)
    kc = torch.zeros(B, Hkv, budget + c, D)
    vc = torch.zeros_like(kc)
    f = torch.zeros(B, budget + c)
    pos = torch.full((B, budget + c), -1, dtype=torch.int64)
    seq = torch.zeros(B, dtype=torch.int64)
    for s in range(5):
        q = -torch.rand(B, 2, c, D, generator=g) - 0.5
        k = torch.ones(B, Hkv, c, D)
        v = torch.randn(B, Hkv, c, D, generator=g)
        emu.decode_step(q, k, v, kc, vc, f, pos, seq, None, D ** -0.5, 0, budget, None,
                        split_cols=split_cols)
        n = (s + 1) * c
        for b in range(B):
            kept = sorted(p for p in pos[b].tolist() if p >= 0)
            assert kept == [0] + list(range(max(1, n - budget + 1), n)), (s, b, kept)
    assert bool((f[pos >= 0] == 0).all())


def test_tensor_core_path_refuses_what_it_cannot_run(emu):
    q = torch.randn(1, 1, 40, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        emu.prefill_fwd(q, q, q, q[:, 0], q[:, 0], 0.125, path="tc")
    q = torch.randn(1, 1, 40, 48, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        emu.prefill_fwd(q, q, q, q[:, 0], q[:, 0], 0.125, path="tc")


def test_misaligned_rows_fall_back_to_simt(emu):
    # A view one element into its storage: 16-byte loads would fault, so the launcher must
    # choose the SIMT kernel on its own.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1 * 2 * 40 * 64 + 1, generator=g).to(torch.bfloat16)
    q = base[1:].view(1, 2, 40, 64)
    k, v = q[:, :1], q[:, 1:]
    os.environ.pop("SELATTN_CUDA_FORCE_SIMT", None)
    os.environ["SELATTN_CUDA_TC_BWD"] = "1"
    with pytest.raises(ValueError, match="aligned"):
        emu.prefill_fwd(q, k, v, q[:, 0], k[:, 0], 0.125, path="tc")
    out, _ = emu.prefill_fwd(q, k, v, q[:, 0], k[:, 0], 0.125, path="simt")
    ref = cases.reference.attention(q.double(), k.double(), v.double(), q_sel=q[:, 0].double(),
                                    k_sel=k[:, 0].double(), scale=0.125)
    assert (out.double() - ref).abs().max() < 0.05


# ---- a planted defect must be caught --------------------------------------------------------

@pytest.mark.parametrize("defect, case", [
    ("missing_syncthreads", cases.PrefillCase(torch.float32, 40, seqlen=45, path="simt")),
    ("fragment_index", cases.PrefillCase(torch.bfloat16, 32, seqlen=40, path="tc")),
    ("tail_guard", cases.PrefillCase(torch.float32, 40, seqlen=45, path="simt")),
    ("varlen_offset", cases.ci_varlen_cases()[0]),
    ("varlen_dout_offset", cases.ci_varlen_cases()[1]),
    ("tc_prepass_fragment_row", cases.PrefillCase(torch.bfloat16, 32, seqlen=70, path="tc")),
    ("tc_bwd_dsum_overwrite", cases.tc_bwd_head_group_cases()[0]),
])
def test_planted_defects_are_caught(defect, case):
    # Each defect is planted in a scratch copy of csrc/ (emulated.DEFECTS) and built apart.
    broken = emulated.load(defect=defect)
    check = cases.check_varlen if isinstance(case, cases.VarlenCase) else cases.check_prefill
    try:
        records = check(broken, case)
    except emulated.EmulationError:
        return  # a launch failure or runtime report: caught
    assert not all(r["passed"] for r in records), f"defect {defect} went unnoticed"


@pytest.mark.parametrize("defect", ["decode_missing_barrier"])
def test_planted_decode_defects_are_caught(defect):
    # The split-KV decode kernel without the barrier that ends a tile: the next cp.async refill
    # poisons a stage other threads still read. (All decode defects: run_all.py --defects.)
    broken = emulated.load(defect=defect)
    for case in cases.decode_defect_probes():
        try:
            records = cases.check_decode(broken, case)
        except emulated.EmulationError:
            return
        if not all(r["passed"] for r in records):
            return
    pytest.fail(f"defect {defect} went unnoticed")
