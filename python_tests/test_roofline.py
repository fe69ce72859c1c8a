"""bench/roofline.py, the cost model of the CUDA kernels: its counts agree with closed forms
for small shapes (tile counts, GEMM FLOPs, atomics), its pieces agree with each other (FLOPs =
mma count x 4096, bounds = slowest pipe), and its report is written. No GPU involved."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import roofline as rl  # noqa: E402


def _tiles(nblocks):
    return nblocks * (nblocks + 1) // 2


@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("n", [64, 100, 256, 300])
def test_tc_fwd_flops_closed_form(n, d):
    s = rl.Shape(2, 3, 3, n, d)
    k = rl.tc_fwd_cost(s)
    nqb, nkt = math.ceil(n / 128), math.ceil(n / 64)
    # 128-row query blocks over 64-key tiles: block i (from 1) walks min(2i, key tiles) tiles,
    # three 128 x 64 x D GEMMs (selection, QK^T, PV) each, per (batch, head).
    tiles = sum(min(2 * i, nkt) for i in range(1, nqb + 1))
    assert k.total["tc_flops"] == 3 * 2 * 128 * 64 * d * tiles * 2 * 3
    assert k.total["tc_flops"] == k.total["mma"] * rl.MMA_FLOPS
    assert k.ctas == nqb * 2 * 3 and k.threads == 256
    assert k.per_cta_max["tc_flops"] == 3 * 2 * 128 * 64 * d * nkt  # the last query block
    # Shared memory as the kernel's TcFwdConfig::kSmemBytes computes it.
    assert k.smem_bytes == (2 * 128 + 3 * 64) * (d + 8) * 2 + 8 * 64 * 4 + 64 * 72 * 4


@pytest.mark.parametrize("hq,hkv,packed", [(8, 2, 4), (6, 3, 2), (3, 1, 1), (8, 1, 4)])
def test_tc_fwd_packgqa(hq, hkv, packed):
    """PackGQA: H' q heads of a kv group per CTA, R = 128 / H' rows of each; QK^T and PV
    for every packed row, the selection GEMM once per query row (not per head)."""
    n, d = 512, 64
    s = rl.Shape(1, hq, hkv, n, d)
    assert rl.tc_fwd_heads_per_cta(s) == packed
    k = rl.tc_fwd_cost(s)
    r = 128 // packed
    nqb, nkt = n // r, n // 64
    tiles = sum(min(math.ceil(i * r / 64), nkt) for i in range(1, nqb + 1))
    copies = hq // packed
    assert k.ctas == nqb * copies
    per_tile = 2 * 2 * 128 * 64 * d + 2 * r * 64 * d  # QK^T, PV (packed rows); selection (R)
    assert k.total["tc_flops"] == per_tile * tiles * copies
    assert k.total["tc_flops"] == k.total["mma"] * rl.MMA_FLOPS


def _tc_bwd_smem(d):
    acc = (2 if d > 64 else 1) * 64 * (d + 8) * 4  # dKsel, and dK from D > 64 on
    return (6 * 64) * (d + 8) * 2 + 2 * 64 * 72 * 2 + 3 * 64 * 4 + acc + 2 * 32 * 128 * 4


@pytest.mark.parametrize("d", [64, 96, 128])
def test_tc_bwd_flops_and_atomics(d):
    n = 192
    s = rl.Shape(1, 4, 2, n, d)
    k = rl.tc_bwd_cost(s)
    assert rl.tc_bwd_heads_per_cta(s) == 1  # 6 CTAs: far below 2 per SM, no head grouping
    nkb = n // 64
    tiles = _tiles(nkb) * 4
    assert k.total["tc_flops"] == 8 * 2 * 64 * 64 * d * tiles  # 8 GEMMs per tile
    assert k.total["tc_flops"] == k.total["mma"] * rl.MMA_FLOPS
    # dQ and dQ_sel: one fp32 atomic per (row, d) per tile; dK, dV, dK_sel once per CTA.
    assert k.total["red"] == 2 * 64 * d * tiles + 3 * 64 * d * nkb * 4
    assert k.smem_bytes == _tc_bwd_smem(d)


@pytest.mark.parametrize("d", [64, 128])
def test_tc_bwd_head_groups(d):
    """A GQA group of 4 with enough key blocks: one CTA per group, A^T, dKsel and dQsel (and
    their atomics) once per CTA, the 5 per-head GEMMs and dQ atomics per head."""
    n = 16384
    s = rl.Shape(1, 8, 2, n, d)
    assert rl.tc_bwd_heads_per_cta(s) == 4
    # 128 key blocks x 4 CTAs of 2 heads >= 2 x 132 SMs; 64 x 8 at N = 4096 are not.
    assert rl.tc_bwd_heads_per_cta(rl.Shape(1, 8, 2, 8192, d)) == 2
    assert rl.tc_bwd_heads_per_cta(rl.Shape(1, 8, 2, 4096, d)) == 1
    k = rl.tc_bwd_cost(s)
    nkb = n // 64
    copies = 8 // 4
    tiles = _tiles(nkb) * copies
    assert k.ctas == nkb * copies
    assert k.total["tc_flops"] == (3 + 5 * 4) * 2 * 64 * 64 * d * tiles
    assert k.total["red"] == (4 + 1) * 64 * d * tiles + 3 * 64 * d * nkb * copies
    assert k.smem_bytes == _tc_bwd_smem(d)


@pytest.mark.parametrize("d", [16, 64, 100])
def test_simt_kernels_closed_form(d):
    n = 70
    s = rl.Shape(1, 2, 1, n, d)
    dpad = 32 * rl._chunks(d)
    nqb = math.ceil(n / 32)
    fwd = rl.simt_fwd_cost(s)
    assert fwd.total["simt_flops"] == 3 * 2 * 32 * 32 * dpad * _tiles(nqb) * 2
    bwd = rl.simt_bwd_cost(s)
    assert bwd.total["simt_flops"] == 8 * 2 * 32 * 32 * dpad * _tiles(nqb) * 2
    # dq and dq_sel: one atomic per (row, padded d) per tile; dk, dv, dk_sel once per CTA.
    assert bwd.total["red"] == 2 * 32 * dpad * _tiles(nqb) * 2 + 3 * 32 * d * nqb * 2
    # The pre-pass: one 32 x 32 x D selection GEMM per causal block pair, once per batch
    # element (not per head), plus the 32-row column sums.
    pre = rl.prepass_costs(s)[0]
    assert pre.total["simt_flops"] == (2 * 32 * 32 * dpad + 1024) * _tiles(nqb)
    assert pre.ctas == nqb * nqb


def test_bound_is_the_slowest_pipe():
    s = rl.Shape(1, 8, 8, 2048, 128)
    for k in rl.prefill_kernels(s, "tc", backward=True):
        k.finish(rl.H100, rl.H100.tc_tflops_spec)
        pipes = {p: v for p, v in k.bound_us.items() if p not in ("lower_bound", "waves")}
        assert k.bound_us["lower_bound"] == max(pipes.values())
        assert k.limiter == max(pipes, key=pipes.get)
    # Tensor-bound time scales with the rate: a slower rate can only raise a bound.
    fast = rl.prefill_bounds(s, rl.H100, "spec")
    slow = rl.prefill_bounds(s, rl.H100, "mma_sync")
    for key in ("fa2_fwd_us", "fa2_bwd_us", "tc_fwd_us", "tc_bwd_us"):
        assert slow[key] >= fast[key]


def test_fa2_and_ratios():
    s = rl.Shape(1, 16, 16, 16384, 128)
    fa = rl.fa2_bound(s, rl.H100, rl.H100.tc_tflops_spec, backward=False)
    assert fa["tc_flops"] == 4 * 128 * 16 * rl.causal_pairs(16384)
    b = rl.prefill_bounds(s)
    # MHA: our tensor-core forward computes 3 GEMMs per full tile where FA2 needs 2 per causal
    # pair: 1.5x, plus the masked parts of the diagonal tiles and the pre-pass.
    assert 1.5 < b["tc_fwd_flops_over_fa2"] < 1.6
    assert 1.6 < b["tc_bwd_flops_over_fa2"] < 1.7  # 8 GEMMs where FA2 has 5
    assert b["min_fwd_flops_over_fa2"] == pytest.approx(1 + 1 / (2 * 16) + 1 / (2 * 16), rel=1e-3)
    # GQA 4:1: the selection GEMM once per 4 heads in the forward (PackGQA), A^T, dKsel and
    # dQsel once per 4 heads in the backward.
    g = rl.prefill_bounds(rl.Shape(1, 32, 8, 8192, 128))
    assert 1.1 < g["tc_fwd_flops_over_fa2"] < 1.2
    assert 1.1 < g["tc_bwd_flops_over_fa2"] < 1.2
    # Quadratic work: doubling N at fixed tokens per batch doubles the time.
    b2 = rl.prefill_bounds(rl.Shape(2, 16, 16, 8192, 128))
    assert 1.9 < b["fa2_fwd_us"] / b2["fa2_fwd_us"] < 2.1


def test_decode_bytes():
    by = rl.decode_step_bytes(4, 8, 8, 1025, 128)
    assert by["kv_bytes"] == 2 * 4 * 8 * 1025 * 128 * 2
    assert by["ideal_bytes"] > by["kv_bytes"]
    # The kernels read K and V once per kv group (GQA-packed), so at GQA 4:1 a step requests
    # close to the K/V bytes, not 4x; the split states add a little on top.
    gqa = rl.decode_step_bytes(4, 32, 8, 1025, 128)
    assert gqa["ideal_bytes"] < 1.1 * gqa["kv_bytes"]
    assert gqa["ideal_bytes"] < gqa["current_bytes"] < 1.3 * gqa["kv_bytes"]
    # The split plan of decode::Workspace: 4 CTAs per SM over B * Hkv groups, >= 64 columns.
    assert rl.decode_splits(1, 8, 1025) == 17 and rl.decode_splits(64, 8, 1025) == 2
    # A chunk reads the selection group's keys in every other group as well.
    chunk = rl.decode_step_bytes(1, 32, 8, 1025, 128, chunk=64)
    assert chunk["current_bytes"] > 1.8 * chunk["kv_bytes"]
    for row in rl.decode_full_vs_pruned():
        assert row["full_over_pruned"] == pytest.approx(32768 / 2049, rel=0.02)


def test_report_written(tmp_path):
    rl.main(["--out", str(tmp_path)])
    files = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md"]
    data = json.load(open(tmp_path / files[0]))
    assert len(data["prefill_bounds"]) == 2 * 3 * len(rl.report_shapes())
    assert {r["budget"] for r in data["decode"]} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {r["B"] for r in data["decode"]} >= {1, 64}
    md = open(tmp_path / files[1]).read()
    assert "FlashAttention-2" in md and "Full cache vs pruned" in md


@pytest.mark.parametrize("n, begin, end", [(70, 0, None), (400, 0, 6), (400, 6, 12), (400, 12, 13),
                                          (1000, 0, None), (8192, 0, None)])
def test_tc_prepass_grid_is_the_causal_half(n, begin, end):
    # tc_colsum_tiles mirrors TcColsumGrid (tc_prepass.cuh). Brute force over 128-row groups
    # and 64-key tiles: a tile has work iff it holds a key j < i for a row i of the group
    # (i < ncols = min(n, 32 end)), the only keys with S != 0.
    nqb = math.ceil(n / 32)
    end = nqb if end is None else end
    ncols = min(n, 32 * end)
    want = []
    for row0 in range(32 * begin, 32 * end, 128):
        last = min(row0 + 127, ncols - 1)
        want.append(sum(1 for t in range(math.ceil(ncols / 64)) if 64 * t < last))
    got = rl.tc_colsum_tiles(n, begin, end)
    # The kernel's count for the last group may keep one all-zero tile (its blocks' rows past
    # the superchunk are not stored), never fewer than the tiles with work.
    assert got[:-1] == want[:-1] and want[-1] <= got[-1] <= want[-1] + 1
    # The causal half: about half of the rectangular (groups x key tiles) grid for one
    # superchunk starting at row 0.
    if begin == 0 and n >= 1000:
        rect = math.ceil(nqb / 4) * math.ceil(n / 64)
        assert 0.45 < sum(got) / rect < 0.6


@pytest.mark.parametrize("d", [32, 64, 128])
def test_tc_prepass_flops_closed_form(d):
    s = rl.Shape(2, 4, 4, 1000, d)
    k = rl.prepass_tc_costs(s)[0]
    ctas = sum(rl.tc_colsum_tiles(1000))
    assert k.ctas == ctas * 2
    assert k.total["tc_flops"] == 2 * 128 * 64 * d * ctas * 2  # once per batch element
    assert k.total["tc_flops"] == k.total["mma"] * rl.MMA_FLOPS
    assert k.smem_bytes == 192 * (d + 8) * 2  # TcColsumConfig::kSmemBytes
    # Poff: every (block, key) entry written once, computed or zero.
    nqb = math.ceil(1000 / 32)
    assert k.total["global_store_bytes"] <= (ctas * 4 * 64 * 4 * 2 +
                                             nqb * 1000 * 4 * 2)
    # The tensor-core launchers use it; the SIMT ones keep the SIMT pre-pass.
    assert rl.prefill_kernels(s, "tc", False)[0].kernel == "prepass_tc_colsum"
    assert rl.prefill_kernels(s, "simt", False)[0].kernel == "prepass_colsum"


def test_decode_chunk_step_tc_vs_simt():
    # c * G = 100 group rows: 2 passes of 64 on the tensor cores, 7 of Tile::kRows = 16 (D 64)
    # on the SIMT path; each pass streams the CTA's columns once.
    st = rl.ChunkStep(1, 4, 2, 100, 50, 64)
    tc, simt = rl.decode_chunk_cost(st, "tc"), rl.decode_chunk_cost(st, "simt")
    ncols = 100 + 2 * 50
    splits, cps = rl.decode_split_plan(1, 2, ncols)
    assert splits * cps >= ncols > (splits - 1) * cps and cps % 32 == 0
    tiles = sum(-(-min(cps, ncols - s * cps) // 64) for s in range(splits))
    # Three 64 x 64 x D GEMMs (S, Q K^T, P V) per pass and tile, per (batch, kv head).
    assert tc.total["tc_flops"] == 3 * 2 * 64 * 64 * 64 * 2 * tiles * 2
    assert tc.total["tc_flops"] == tc.total["mma"] * rl.MMA_FLOPS
    assert simt.total["tc_flops"] == 0 and simt.total["simt_flops"] > 0
    assert "2 passes of 64" in tc.notes and "7 passes of 16" in simt.notes
    # TcTile<bf16, 64>::kBytes and Tile<bf16, 128>::kBytes as the kernels lay them out.
    assert tc.smem_bytes == rl.decode_tc_smem(64) == 90880
    assert rl.decode_simt_smem(128) == 45536
    # Same unique DRAM bytes; the SIMT kernel re-requests K/V 3.5x as often (7 vs 2 passes).
    assert tc.dram_bytes == simt.dram_bytes
    assert simt.total["global_load_bytes"] > 3 * tc.total["global_load_bytes"]
