"""Cost model of the CUDA kernels (issue 12 item 7, issue 13 item 5): what each prefill kernel
does per CTA as written today, and the lower-bound time that work implies on an H100 / H200,
next to plain causal FlashAttention-2's lower bound on the same shape; and for decode, the bytes
one step must move and the bandwidth-bound time.

Counts come from reading csrc/cuda/prefill/*.cuh (tile sizes, threads, loops) and are kept per
warp-instruction class, because that is what the SM's pipes are rated in:
  mma      mma.sync.m16n8k16 (4096 FLOPs each)         -> tensor pipe
  ffma     fp32 FMA/FMUL warp instructions             -> FMA pipe (128 lanes/clk/SM)
  mufu     exp/log warp instructions                   -> MUFU (16 lanes/clk/SM)
  shfl     warp shuffles                               -> 32 lanes/clk/SM (1 warp instr/clk)
  lds/sts  32-bit shared loads/stores (1 wavefront each, conflict-free as the padding makes
           them), sts128 16-byte stores and ldsm (ldmatrix.x4): 4 wavefronts each
                                                       -> 128 B/clk/SM of shared memory
  ldg/stg  global loads/stores (bytes kept separately), red (fp32 atomics, one per element)
Per kernel the lower bound is the slowest pipe at full rate with perfect overlap (max, not
sum) over the whole grid, all SMs busy; the counted instructions are a subset of what issues
(no address arithmetic, conversions, predicates), so the issue bound is a lower bound too.
DRAM bytes are the unique bytes a kernel must move (re-reads assumed to hit L2); the bytes each
CTA requests (global_load_bytes, mostly L2 hits) are listed separately.

What this cannot say: latency. Most kernels' loads are synchronous between barriers, so each
key/query tile costs one exposed memory round trip unless other CTAs on the SM cover it; the
tensor-core forward issues its loads with cp.async a step ahead of their use (FlashAttention-2's
order), so only its first tile's round trip is exposed. `occupancy` (CTAs/SM from shared
memory, threads and the ptxas register counts below) and `round_trips_per_cta` say how exposed
that is.

    python bench/roofline.py                       # writes bench/results/roofline_<date>_<commit>.{json,md}
    python bench/roofline.py --out DIR --print
The decode section also prices one chunk step's attend launch on both paths
(decode_chunk_cost: attend_kernel vs the tensor-core attend_tc_kernel).
As a module: prefill_bounds(shape, gpu) and decode_step_bytes(...) are used by
bench/prefill_paths.py to print measured time as a percentage of the bound.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MMA_FLOPS = 2 * 16 * 8 * 16  # one mma.sync.m16n8k16


# ---- machines --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_ghz: float          # the clock the tensor spec is quoted at
    tc_tflops_spec: float     # dense bf16/fp16
    tc_tflops_measured: float  # a large cuBLAS bf16 GEMM on such a card (wgmma)
    hbm_tbps: float           # spec
    copy_tbps: float          # device-to-device copy measured on such a card (read + write)
    smem_per_sm: int = 228 * 1024
    smem_per_block_optin: int = 227 * 1024
    threads_per_sm: int = 2048
    ctas_per_sm: int = 32
    # Per SM per clock: fp32 FMA lanes, MUFU lanes, shuffle lanes, shared bytes, issue slots.
    fma_lanes: int = 128
    mufu_lanes: int = 16
    shfl_lanes: int = 32
    smem_bytes_per_clk: int = 128
    issue_per_clk: int = 4

    @property
    def mma_sync_tflops(self) -> float:
        """Ceiling of sm_80-style mma.sync on Hopper: about 2/3 of the wgmma peak, as reported
        by the FlashAttention-3 paper (to be confirmed by bench/gpu_check.sh)."""
        return self.tc_tflops_spec * 2 / 3


# 132 SMs x 4 tensor cores x 1024 dense bf16 FLOPs/clk at 1.83 GHz = 989 TFLOP/s.
H100 = Gpu("H100 SXM", 132, 1.83, 989.0, 800.0, 3.35, 3.0)
H200 = Gpu("H200 SXM", 132, 1.83, 989.0, 790.0, 4.8, 4.3)
GPUS = {"h100": H100, "h200": H200}


# ---- shapes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    seqlen: int
    head_dim: int
    elem_bytes: int = 2  # bf16/fp16

    @property
    def label(self) -> str:
        gqa = f"/{self.heads_kv}" if self.heads_kv != self.heads_q else ""
        return f"B{self.batch} H{self.heads_q}{gqa} N{self.seqlen} D{self.head_dim}"


def causal_pairs(n: int) -> int:
    """(i, j) with j <= i < n."""
    return n * (n + 1) // 2


def gpu_check_shapes() -> List[Shape]:
    """What bench/gpu_check.sh times: bench/prefill_paths.py's grid (16K tokens per batch,
    H = 16, D = 64 and 128, N = 1K..16K) plus the issue's B=1 H=32 N=8K D=128 reading."""
    shapes = [Shape(max(1, 16384 // n), 16, 16, n, d)
              for d in (64, 128) for n in (1024, 2048, 4096, 8192, 16384)]
    shapes.append(Shape(1, 32, 32, 8192, 128))
    return shapes


def report_shapes() -> List[Shape]:
    """gpu_check_shapes() and the same B=1 H=32 N=8K D=128 reading with GQA 4:1 (8 kv heads,
    Llama-like): PackGQA in the forward, head groups in the backward."""
    return gpu_check_shapes() + [Shape(1, 32, 8, 8192, 128)]


# ---- registers ---------------------------------------------------------------------------------

# Registers per thread of each kernel, `nvcc -O3 --use_fast_math -gencode arch=compute_90,
# code=sm_90 -Xptxas -v` (nvcc 13.0, bf16 instantiations; the filtered log is
# bench/results/ptxas_sm90_prefill_*.txt). Keys: (kernel, head-dim chunks of 32 (SIMT) or head
# dim (tensor cores)). Occupancy follows from these, shared memory and threads.
REGISTERS_SM90: Dict[tuple, int] = {
    ("prepass_colsum", 1): 34, ("prepass_colsum", 2): 40, ("prepass_colsum", 4): 40,
    ("prepass_colsum", 8): 40, ("prepass_scan", 0): 32,
    ("simt_fwd", 1): 96, ("simt_fwd", 2): 108, ("simt_fwd", 4): 190, ("simt_fwd", 8): 150,
    ("simt_bwd", 1): 124, ("simt_bwd", 2): 148, ("simt_bwd", 4): 203, ("simt_bwd", 8): 248,
    ("prepass_tc_colsum", 32): 95, ("prepass_tc_colsum", 64): 96, ("prepass_tc_colsum", 96): 96,
    ("prepass_tc_colsum", 128): 96,
    ("tc_fwd", 32): 128, ("tc_fwd", 64): 207, ("tc_fwd", 96): 223, ("tc_fwd", 128): 239,
    ("tc_bwd", 32): 248, ("tc_bwd", 64): 248, ("tc_bwd", 96): 244, ("tc_bwd", 128): 252,
    # csrc/cuda/decode (bf16; bench/results/ptxas_sm90_decode_tc_*.txt). attend_kernel spills
    # 36-40 bytes at head dims >= 64 (80 registers); attend_tc_kernel does not spill.
    ("decode_attend_simt", 32): 94, ("decode_attend_simt", 64): 80,
    ("decode_attend_simt", 96): 80, ("decode_attend_simt", 128): 80,
    ("decode_attend_tc", 32): 127, ("decode_attend_tc", 64): 143,
    ("decode_attend_tc", 96): 182, ("decode_attend_tc", 128): 219,
}


# Whether the tensor-core launchers run the tensor-core pre-pass (prepass_tc_costs): they do
# (launch_selection_prepass<T, chunks, kD> in tc_fwd.cuh / tc_bwd.cuh).
TC_PREPASS = True


def _regs(kernel: str, key: int) -> int:
    return REGISTERS_SM90.get((kernel, key), 0)


# ---- per-kernel counts -----------------------------------------------------------------------

COUNT_KEYS = ("tc_flops", "simt_flops", "mma", "ffma", "mufu", "shfl", "lds", "sts", "sts128",
              "ldsm", "barriers", "ldg", "global_load_bytes", "global_store_bytes", "red")


def _zero() -> Dict[str, float]:
    return {k: 0.0 for k in COUNT_KEYS}


def _add(acc: Dict[str, float], part: Dict[str, float], times: float = 1.0) -> None:
    for k, v in part.items():
        acc[k] = acc.get(k, 0.0) + v * times


@dataclass
class KernelCost:
    """One launch: per-CTA counts (the longest CTA and the mean), totals over the grid, the
    unique DRAM bytes, occupancy, and the lower-bound times per pipe."""
    kernel: str
    ctas: int
    threads: int
    smem_bytes: int
    round_trips_per_cta: float  # synchronous global-load round trips of the longest CTA
    per_cta_max: Dict[str, float]
    per_cta_mean: Dict[str, float]
    total: Dict[str, float]
    dram_bytes: float
    notes: str = ""
    registers: int = 0  # per thread, from ptxas for sm_90 (REGISTERS_SM90); 0 = unknown
    occupancy: int = 0
    bound_us: Dict[str, float] = field(default_factory=dict)
    limiter: str = ""

    def finish(self, gpu: Gpu, tc_tflops: float) -> "KernelCost":
        per_sm_smem = self.smem_bytes + 1024  # the runtime reserves 1 KB per CTA
        # Registers are allocated per warp in units of 256: 65536 per SM.
        warp_regs = -(-self.registers * 32 // 256) * 256
        by_regs = 65536 // (warp_regs * (self.threads // 32)) if self.registers else 99
        self.occupancy = max(0, min(gpu.ctas_per_sm, gpu.threads_per_sm // self.threads,
                                    gpu.smem_per_sm // per_sm_smem if self.smem_bytes else 99,
                                    by_regs))
        clk = gpu.clock_ghz * 1e9 * gpu.sms  # SM-clocks per second over the chip
        t = self.total
        wavefronts = t["lds"] + t["sts"] + 4 * t["sts128"] + 4 * t["ldsm"]
        issued = (t["mma"] + t["ffma"] + t["mufu"] + t["shfl"] + t["lds"] + t["sts"] +
                  t["sts128"] + t["ldsm"] + t["ldg"] + t["red"] / 32)
        b = {
            "tensor": t["tc_flops"] / (tc_tflops * 1e12),
            "fma": t["ffma"] * 32 / (gpu.fma_lanes * clk),
            "mufu": t["mufu"] * 32 / (gpu.mufu_lanes * clk),
            "shfl": t["shfl"] * 32 / (gpu.shfl_lanes * clk),
            "smem": wavefronts * 128 / (gpu.smem_bytes_per_clk * clk),
            "issue": issued / (gpu.issue_per_clk * clk),
            "dram": self.dram_bytes / (gpu.hbm_tbps * 1e12),
        }
        self.bound_us = {k: v * 1e6 for k, v in b.items()}
        self.limiter = max(b, key=b.get)
        self.bound_us["lower_bound"] = max(b.values()) * 1e6
        # How many times the grid fills the chip: a partial last wave idles SMs.
        slots = gpu.sms * max(1, self.occupancy)
        self.bound_us["waves"] = self.ctas / slots
        return self


def _grid_cost(kernel: str, threads: int, smem: int, fixed: Dict[str, float],
               tile: Dict[str, float], tiles_per_cta: Sequence[int], copies: int,
               dram_bytes: float, round_trips_fixed: float, round_trips_per_tile: float,
               notes: str = "", extra_total: Optional[Dict[str, float]] = None) -> KernelCost:
    """Costs of a grid whose CTAs do `fixed` once and `tile` per tile; `tiles_per_cta` lists
    the distinct CTAs of one (batch, head) slice, `copies` such slices."""
    ctas = len(tiles_per_cta) * copies
    tmax = max(tiles_per_cta) if tiles_per_cta else 0
    tsum = sum(tiles_per_cta)
    per_max, total = _zero(), _zero()
    _add(per_max, fixed)
    _add(per_max, tile, tmax)
    _add(total, fixed, ctas)
    _add(total, tile, tsum * copies)
    if extra_total:
        _add(total, extra_total)
    mean = {k: v / ctas for k, v in total.items()} if ctas else _zero()
    return KernelCost(kernel, ctas, threads, smem, round_trips_fixed + tmax * round_trips_per_tile,
                      per_max, mean, total, dram_bytes, notes)


def _chunks(d: int) -> int:
    """32-wide head-dim chunks of the SIMT kernels (head_dim_chunks in common.cuh)."""
    return 1 if d <= 32 else 2 if d <= 64 else 4 if d <= 128 else 8


def _simt_tile_dot(c: int, es: int, warps: int = 8) -> Dict[str, float]:
    """tile_dot over c chunks (common.cuh), per CTA: stage two 32x32 chunks (4 scalar loads and
    4 stores per thread each), 2 barriers, then per dd: 1 column load ys[lane][dd], 4 broadcast
    loads xs[r][dd], 4 FMA per thread."""
    return dict(ldg=8 * warps * c, sts=8 * warps * c, lds=160 * warps * c, ffma=128 * warps * c,
                barriers=2 * c, global_load_bytes=2 * 1024 * es * c,
                simt_flops=2 * 32 * 32 * 32 * c)


def prepass_costs(s: Shape) -> List[KernelCost]:
    """selection_colsum_kernel + exclusive_scan_blocks_kernel (prepass.cuh): grid (N/32 column
    tiles, N/32 query blocks, B), 256 threads; CTAs above the diagonal write 32 zeros and exit."""
    n, es = s.seqlen, s.elem_bytes
    nqb = math.ceil(n / 32)
    c = _chunks(s.head_dim)
    active = nqb * (nqb + 1) // 2
    tile = _simt_tile_dot(c, es)
    _add(tile, dict(sts=4 * 8, barriers=1, ffma=4 * 8,  # s_tile = relu(scale * a), masked
                    lds=32, simt_flops=1024, global_store_bytes=32 * 4))  # warp 0: 32-row sum
    # Every CTA of the grid: active ones do one tile; the others only store zeros.
    poff = s.batch * nqb * n * 4
    cost = _grid_cost("prepass_colsum", 256, 3 * 32 * 33 * 4, _zero(), tile,
                      [1] * active, s.batch,
                      dram_bytes=2 * s.batch * n * s.head_dim * es + poff,
                      round_trips_fixed=0, round_trips_per_tile=c,
                      notes="SIMT fp32: 5 shared loads per 4 FMA; the upper half of the grid only "
                            "writes zeros",
                      extra_total=dict(global_store_bytes=(nqb * nqb - active) * 32 * 4 * s.batch))
    cost.ctas = nqb * nqb * s.batch
    cost.registers = _regs("prepass_colsum", c)
    # 256 columns per CTA, each thread walks all nqb blocks of its column.
    scan = _grid_cost("prepass_scan", 256, 0, _zero(),
                      dict(ldg=nqb * 8, global_load_bytes=nqb * 4 * 256,
                           global_store_bytes=nqb * 4 * 256, simt_flops=nqb * 256),
                      [1], math.ceil(s.batch * n / 256), dram_bytes=2 * poff,
                      round_trips_fixed=0, round_trips_per_tile=nqb,
                      notes="one thread per (b, j) walks all query blocks: a dependent chain of "
                            "N/32 loads")
    scan.registers = _regs("prepass_scan", 0)
    return [cost, scan]


def tc_colsum_tiles(n: int, begin: int = 0, end: Optional[int] = None) -> List[int]:
    """Column tiles (64 keys) per 128-row group of tc_selection_colsum_kernel for the query
    blocks [begin, end) of one superchunk (TcColsumGrid in tc_prepass.cuh): group g has
    c0 + 2g tiles, the last group clipped to ceil(ncols / 64). One CTA per (group, tile)."""
    nqb = math.ceil(n / 32)
    end = nqb if end is None else end
    ncols = min(n, end * 32)
    c0 = (begin * 32 + 126) // 64 + 1
    tmax = math.ceil(ncols / 64)
    return [min(c0 + 2 * g, tmax) for g in range(math.ceil((end - begin) / 4))]


def prepass_tc_costs(s: Shape) -> List[KernelCost]:
    """tc_selection_colsum_kernel (tc_prepass.cuh) + the shared scan, as the tensor-core
    launchers run them (one superchunk assumed): a 1-D grid over the causal (128-row group,
    64-key tile) pairs only, 128 threads; per CTA the Q_sel (128 x D) and K_sel (64 x D) tiles
    staged once, 4 warps x 2 m-tiles x 8 n-tiles of mma (each k-step 2 A + 4 B ldmatrix.x4 for
    16 mma per warp), relu/mask/sum in registers, a 14-shuffle reduce-scatter per warp, 2 fp32
    stores per lane; plus the zero band (2 blocks x 128 keys) for the earlier groups' blocks."""
    n, d, es = s.seqlen, s.head_dim, s.elem_bytes
    w = 4
    tiles = tc_colsum_tiles(n)
    ctas = sum(tiles)
    # Per thread: 64 scale multiplies + 64 relu (select) + 48 adds of the 4 rows per column,
    # 14 adds after the shuffles (FMA-pipe instructions, per warp).
    tile = dict(ldg=192 * (d // 8) // 32, sts128=192 * (d // 8) // 32,
                barriers=1, ldsm=6 * (d // 16) * w, mma=16 * (d // 16) * w,
                tc_flops=2 * 128 * 64 * d, shfl=14 * w, ffma=(64 + 64 + 48 + 14) * w,
                simt_flops=2 * 128 * 64, global_load_bytes=192 * d * es,
                global_store_bytes=4 * 64 * 4)
    nqb = math.ceil(n / 32)
    poff = s.batch * nqb * n * 4
    # Zeros: every Poff entry of the superchunk not in a computed tile (the scan reads them).
    zero_bytes = sum(n - min(tiles[blk // 4] * 64, n) for blk in range(nqb)) * 4 * s.batch
    cost = _grid_cost("prepass_tc_colsum", 128, 192 * (d + 8) * es, _zero(), tile,
                      [1] * ctas, s.batch, dram_bytes=2 * s.batch * n * d * es + poff,
                      round_trips_fixed=0, round_trips_per_tile=1,
                      notes="selection GEMM on the tensor cores, once per batch element; only "
                            "the causal half of the (128-row, 64-key) tiles launched",
                      extra_total=dict(global_store_bytes=zero_bytes))
    cost.registers = _regs("prepass_tc_colsum", d)
    return [cost, prepass_costs(s)[1]]


def simt_fwd_cost(s: Shape) -> KernelCost:
    """simt_fwd_kernel (simt_fwd.cuh): grid (N/32, Hq, B), 256 threads, 32x32 tiles; per tile
    three tile_dot-style GEMMs (selection, QK^T, PV), F by warp 0, online softmax with shuffles."""
    n, d, es, c = s.seqlen, s.head_dim, s.elem_bytes, _chunks(s.head_dim)
    nqb = math.ceil(n / 32)
    tile = _zero()
    _add(tile, _simt_tile_dot(c, es))  # selection
    _add(tile, dict(sts=32, barriers=1, ffma=32))  # s_tile
    _add(tile, dict(ldg=1, global_load_bytes=32 * 4, sts=32, lds=32, barriers=1))  # F (warp 0)
    _add(tile, _simt_tile_dot(c, es))  # QK^T
    # Online softmax: per row slot u, 1 load of F, 5 + 5 shuffles, 2 exp, rescale of o.
    _add(tile, dict(lds=4 * 8, shfl=40 * 8, mufu=8 * 8, ffma=(4 * 4 + 4 * c) * 8))
    # PV per chunk: stage V (4 loads/stores per thread), 2 barriers, 32 x (1 load, 4 shuffles,
    # 4 FMA) per thread.
    _add(tile, dict(ldg=4 * 8 * c, sts=4 * 8 * c, barriers=2 * c, lds=32 * 8 * c,
                    shfl=128 * 8 * c, ffma=128 * 8 * c, global_load_bytes=1024 * es * c,
                    simt_flops=2 * 32 * 32 * 32 * c))
    fixed = dict(global_store_bytes=32 * d * es + 32 * 4)
    h, hk = s.heads_q, s.heads_kv
    # q, k, v, q_sel, k_sel, out; lse; the causal half of Poff (re-reads by heads: L2).
    dram = (s.batch * n * d * es * (2 * h + 2 * hk + 2) + s.batch * h * n * 4 +
            s.batch * nqb * n * 4 / 2)
    cost = _grid_cost("simt_fwd", 256, 4 * 32 * 33 * 4, fixed, tile,
                      list(range(1, nqb + 1)), s.batch * h, dram, 0, 3 * c + 1,
                      notes="selection tile recomputed per head; 2-byte scalar loads; "
                            "P broadcast by shuffles in PV")
    cost.registers = _regs("simt_fwd", c)
    return cost


def tc_fwd_heads_per_cta(s: Shape) -> int:
    """tc_fwd_heads_per_cta in tc_fwd.cuh (PackGQA): 4, 2 or 1, whichever divides the group."""
    group = s.heads_q // s.heads_kv
    return 4 if group % 4 == 0 else 2 if group % 2 == 0 else 1


def tc_fwd_cost(s: Shape) -> KernelCost:
    """tc_fwd_kernel (tc_fwd.cuh): grid (N/R, Hq/H', B), 256 threads (8 warps x 16 packed rows:
    R = 128/H' query rows of each of H' q heads of one kv group), key tiles of 64; cp.async
    loads one step ahead (V of tile j under its selection GEMM and QK^T, K and K_sel of tile
    j + 1 under its softmax and PV), 4 barriers per tile; the selection GEMM and F scan once
    for the R rows (R/16 warps), handed to the other heads' warps through shared memory; QK^T,
    online softmax, PV on mma.sync; O out in 16-byte row vectors."""
    n, d, es = s.seqlen, s.head_dim, s.elem_bytes
    hpc = tc_fwd_heads_per_cta(s)
    packed, w = 128, 8
    rows = packed // hpc
    ws = rows // 16  # selection warps
    nqb = math.ceil(n / rows)
    gemm = dict(ldsm=5 * d // 16, mma=8 * d // 16, tc_flops=2 * 16 * 64 * d)  # per warp
    tile = _zero()
    vec = 3 * 64 * d // 8 // (32 * w)  # uint4 loads per thread for K, K_sel, V
    # cp.async: one instruction per 16 bytes; its shared-memory write counted as an sts128.
    _add(tile, dict(barriers=3, ldg=vec * w, sts128=vec * w, global_load_bytes=3 * 64 * d * es))
    _add(tile, gemm, ws)  # A = Q_sel K_sel^T, selection warps
    # F (selection warps): 16 (nt, c) pairs x (3 x 2 scan + 2 totals + 2 exclusive) shuffles;
    # warp totals to shared memory (16 predicated stores), a barrier, then Poff (16 loads) and
    # the totals of the warps above (0..ws-1 loads each).
    above = (ws - 1) / 2
    _add(tile, dict(shfl=160 * ws, sts=16 * ws, barriers=1, ldg=16 * ws, lds=16 * above * ws,
                    global_load_bytes=ws * 64 * 4, ffma=(16 + 16 * above) * ws))
    if hpc > 1:  # F through shared memory: 16 float2 stores per selection lane, loads per other
        _add(tile, dict(sts=16 * ws, lds=16 * (w - ws)))
    _add(tile, gemm, w)  # Q K^T
    # Softmax on 32 fragment elements per thread: 32 + 2 exp, 8 shuffles, ~32 FMA + o rescale.
    _add(tile, dict(mufu=34 * w, shfl=8 * w, ffma=(32 + 32 + d // 2) * w))
    # PV: 4 k-steps x D/16 (1 ldmatrix.trans + 2 mma), 16 bf16x2 packs.
    _add(tile, dict(ldsm=4 * d // 16 * w, mma=8 * d // 16 * w, tc_flops=2 * packed * 64 * d))
    # Q (128 packed rows) and Q_sel (R rows) once; O through shared memory (D/4 4-byte stores
    # per thread, then 16-byte row vectors: D/8 lds128 as 4 lds each), lse.
    qvec = (packed + rows) * d // 8 // 32
    fixed = dict(ldg=qvec, sts128=qvec, global_load_bytes=(packed + rows) * d * es,
                 sts=d // 4 * w, lds=d // 2 * w,
                 global_store_bytes=packed * d * es + packed * 4)
    h, hk = s.heads_q, s.heads_kv
    smem = (2 * packed + 3 * 64) * (d + 8) * es + w * 64 * 4 + packed // 2 * 72 * 4
    # q, k, v, q_sel, k_sel, out; lse; Poff: every fourth 32-row block, causal part of each.
    dram = (s.batch * n * d * es * (2 * h + 2 * hk + 2) + s.batch * h * n * 4 +
            s.batch * math.ceil(n / 32) * n * 4 / 8)
    key_tiles = math.ceil(n / 64)
    tiles = [min(math.ceil(i * rows / 64), key_tiles) for i in range(1, nqb + 1)]
    cost = _grid_cost("tc_fwd", 32 * w, smem, fixed, tile, tiles, s.batch * h // hpc,
                      dram, 1, 0,
                      notes=f"{hpc} q heads x {rows} rows per CTA (PackGQA: K, K_sel, V tiles "
                            "and the selection GEMM + F shared by them), 8 warps, cp.async one "
                            "step ahead (no second buffer), 160 shuffles per selection-warp "
                            "thread per tile for F, 16-byte output stores")
    cost.registers = _regs("tc_fwd", d)
    return cost


def simt_bwd_cost(s: Shape) -> KernelCost:
    """simt_bwd_kernel (simt_bwd.cuh): grid (N/32 key blocks, Hq, B), 256 threads; per
    (query block, key block) tile: S, F, P, dP (three tile_dots), dL, dA (warp 0), then per
    head-dim chunk five staged operands and the dv/dk/dk_sel/dq/dq_sel products; dq and dq_sel
    by fp32 atomics per element."""
    n, d, es, c = s.seqlen, s.head_dim, s.elem_bytes, _chunks(s.head_dim)
    nqb = math.ceil(n / 32)
    tile = _zero()
    _add(tile, _simt_tile_dot(c, es))  # selection
    _add(tile, dict(sts=32, barriers=1, ffma=32))
    _add(tile, dict(ldg=1, global_load_bytes=32 * 4, sts=32, lds=32, barriers=1))  # F
    _add(tile, _simt_tile_dot(c, es))  # QK^T
    _add(tile, _simt_tile_dot(c, es))  # dO V^T
    # P, dL: per thread 4 x (load F, exp, store P, store dL, lse and Dl loads), a barrier.
    _add(tile, dict(lds=32, sts=64, mufu=32, ldg=64, ffma=64, barriers=1,
                    global_load_bytes=2 * 32 * 4))
    _add(tile, dict(lds=64, sts=32, barriers=1))  # dA, warp 0
    # Per chunk: dv/dk (stage 2, 32 x 4 loads + 2 FMA per row slot), dk_sel (stage 1, 32 x 2
    # loads + 1 FMA), dq/dq_sel (stage 2, 32 x 4 loads + 2 FMA; 8 atomics per thread), 6 barriers.
    per_chunk = dict(ldg=5 * 4 * 8, sts=5 * 4 * 8, barriers=6,
                     lds=(4 * 32 * 4 + 4 * 32 * 2 + 4 * 32 * 4) * 8,
                     ffma=(4 * 32 * 2 + 4 * 32 + 4 * 32 * 2) * 8,
                     red=2 * 32 * 32, global_load_bytes=5 * 1024 * es,
                     global_store_bytes=2 * 32 * 32 * 4, simt_flops=5 * 2 * 32 * 32 * 32)
    _add(tile, per_chunk, c)
    fixed = dict(red=3 * 32 * d, global_store_bytes=3 * 32 * d * 4)
    h, hk = s.heads_q, s.heads_kv
    dram = _bwd_dram(s)
    cost = _grid_cost("simt_bwd", 256, 5 * 32 * 33 * 4, fixed, tile,
                      list(range(nqb, 0, -1)), s.batch * h, dram, 0, 8 * c + 3,
                      notes="8 SIMT GEMMs per tile, 4.5 shared loads per FMA in the gradient "
                            "products, per-element dq/dq_sel atomics on every 32x32 tile")
    cost.registers = _regs("simt_bwd", c)
    return cost


def _bwd_dram(s: Shape) -> float:
    """Unique bytes of any backward: read q, k, v, q_sel, k_sel, out, dout, lse, Dl; the fp32
    accumulators (dq, dk, dv, dq_sel, dk_sel) zeroed, accumulated once, read and converted."""
    b, n, d, es, h, hk = s.batch, s.seqlen, s.head_dim, s.elem_bytes, s.heads_q, s.heads_kv
    rows = h + 2 * hk + 2
    inputs = b * n * d * es * (rows + 2 * h) + 2 * b * h * n * 4
    accum = b * n * d * 4 * rows * 3  # memset, atomics' write-back, epilogue read
    return inputs + accum + b * n * d * es * rows


def tc_bwd_heads_per_cta(s: Shape, sms: int = 132) -> int:
    """tc_bwd_heads_per_cta in tc_bwd.cuh: the largest divisor of the GQA group that leaves at
    least two CTAs per SM."""
    group = s.heads_q // s.heads_kv
    key_blocks = math.ceil(s.seqlen / 64)
    for h in range(group, 1, -1):
        if group % h == 0 and key_blocks * (s.heads_q // h) * s.batch >= 2 * sms:
            return h
    return 1


def tc_bwd_cost(s: Shape) -> KernelCost:
    """tc_bwd_kernel (tc_bwd.cuh): grid (N/64 key blocks, Hq / heads per CTA, B), 128 threads;
    per 64x64 tile and head 5 mma GEMMs (S^T, dP^T, dV, dK, dQ), per tile once for the CTA's
    heads (one kv group) 3 more (A^T, dKsel, dQsel) with the F and dA scans; dQ and dQsel by
    fp32 atomics per element; for D > 64 dK and dKsel accumulate in shared memory."""
    n, d, es = s.seqlen, s.head_dim, s.elem_bytes
    w = 4
    hpc = tc_bwd_heads_per_cta(s)
    nqb = math.ceil(n / 64)
    xyt = dict(ldsm=5 * d // 16 * w, mma=8 * d // 16 * w, tc_flops=2 * 64 * 64 * d)
    acc_reg = dict(ldsm=4 * d // 16 * w, mma=8 * d // 16 * w, tc_flops=2 * 64 * 64 * d)
    acc_smem = dict(ldsm=4 * d // 16 * w, mma=8 * d // 16 * w, tc_flops=2 * 64 * 64 * d,
                    lds=2 * 2 * d // 16 * w * 2, sts=2 * 2 * d // 16 * w * 2)  # float2 RMW
    rows_atomic = dict(ldsm=8 * d // 16 * w, mma=8 * d // 16 * w, tc_flops=2 * 64 * 64 * d,
                       red=64 * d, global_store_bytes=64 * d * 4)
    vec = 64 * d // 8 // 128  # uint4 per thread per 64-row tile
    head = _zero()  # per (query block, head)
    # Q, dO by cp.async (issued during the previous head's dQ phase), lse, Dl.
    _add(head, dict(barriers=1, ldg=2 * vec * w + 2 * w, sts128=2 * vec * w, sts=2 * w,
                    global_load_bytes=2 * 64 * d * es + 2 * 64 * 4))
    _add(head, xyt)  # S^T = K Q^T
    _add(head, dict(mufu=32 * w, lds=32 * w, ffma=32 * w))  # P^T
    _add(head, acc_reg)  # dV += P^T dO
    _add(head, xyt)  # dP^T = V dO^T
    _add(head, dict(lds=32 * w, ffma=32 * w))  # dL^T
    _add(head, acc_smem if d > 64 else acc_reg)  # dK
    _add(head, dict(sts=16 * w, barriers=1))  # dL^T to shared memory
    _add(head, rows_atomic)  # dQ
    block = _zero()  # per query block, once for the CTA's heads
    _add(block, dict(ldg=vec * w, sts128=vec * w, global_load_bytes=64 * d * es))  # Q_sel
    _add(block, xyt)  # A^T = K_sel Q_sel^T
    _add(block, dict(ldg=2 * w, shfl=80 * w, global_load_bytes=w * 32 * 4, ffma=48 * w))  # F^T
    _add(block, dict(shfl=80 * w, ffma=32 * w))  # dA^T suffix sums
    _add(block, acc_smem)  # dK_sel
    _add(block, dict(sts=16 * w))  # dA^T to shared memory
    _add(block, rows_atomic)  # dQ_sel
    if hpc > 1:  # F^T kept for the later heads, dL^T summed over the heads (thread-owned)
        _add(block, dict(sts=32 * w + 32 * (hpc - 1) * w, lds=32 * (hpc - 1) * w +
                         32 * (hpc - 2) * w + 32 * w))
    tile = _zero()
    _add(tile, block)
    _add(tile, head, hpc)
    k_dk = 2 if d > 64 else 1
    fixed = dict(ldg=3 * vec * w, sts128=3 * vec * w, global_load_bytes=3 * 64 * d * es,
                 sts=k_dk * 64 * (d + 8) // 128 * w,
                 red=3 * 64 * d, global_store_bytes=3 * 64 * d * 4)
    smem = ((3 * 64 + 3 * 64) * (d + 8) * es + 2 * 64 * 72 * es + 3 * 64 * 4 +
            k_dk * 64 * (d + 8) * 4 + 2 * 32 * 128 * 4)
    cost = _grid_cost("tc_bwd", 128, smem, fixed, tile, list(range(nqb, 0, -1)),
                      s.batch * s.heads_q // hpc, _bwd_dram(s), 1, 1,
                      notes=f"{hpc} q heads per CTA (A^T, F^T, dA^T, dKsel, dQsel once per "
                            "CTA; K, V loaded once); 5 GEMMs per head (FA2: 5) + 3 per CTA, "
                            "query-side cp.async loads overlap only the dQ phase, 1 CTA of 4 "
                            "warps per SM when shared memory exceeds 114 KB")
    cost.registers = _regs("tc_bwd", d)
    return cost


def bwd_side_costs(s: Shape) -> List[KernelCost]:
    """The backward's memset, Dl row sums and the store of the five accumulators."""
    b, n, d, es, h, hk = s.batch, s.seqlen, s.head_dim, s.elem_bytes, s.heads_q, s.heads_kv
    rows = h + 2 * hk + 2
    dl = _grid_cost("bwd_dl_rowsum", 256, 0, _zero(),
                    dict(global_load_bytes=8 * 2 * d * es, global_store_bytes=8 * 4,
                         ffma=8 * math.ceil(d / 32), shfl=8 * 5), [1],
                    math.ceil(b * h * n / 8), b * h * n * (2 * d * es + 4), 0, 1)
    store = _grid_cost("bwd_store_accum", 256, 0, _zero(),
                       dict(global_load_bytes=256 * 4, global_store_bytes=256 * es), [1],
                       math.ceil(b * n * d * rows / 256), b * n * d * rows * (4 + es), 0, 1)
    memset = _grid_cost("bwd_memset", 256, 0, _zero(), dict(global_store_bytes=256 * 4 * 4), [1],
                        math.ceil(b * n * d * rows / 1024), b * n * d * rows * 4, 0, 0)
    return [memset, dl, store]


# ---- plain causal FlashAttention-2 -------------------------------------------------------------

def fa2_bound(s: Shape, gpu: Gpu, tc_tflops: float, backward: bool) -> Dict[str, float]:
    """FA2's lower bound on the same shape: exact causal pairs (no masked tile halves), 2 GEMMs
    forward (5 backward), one exp per pair (recomputed in the backward), unique bytes; the
    forward also counts FA2's shared-memory wavefronts (its sm80 tiling; the backward's is not
    modelled, so FA2's backward bound is tensor/exp/DRAM only)."""
    b, n, d, es, h, hk = s.batch, s.seqlen, s.head_dim, s.elem_bytes, s.heads_q, s.heads_kv
    pairs = b * h * causal_pairs(n)
    flops = (10 if backward else 4) * d * pairs
    if backward:
        dram = (b * n * d * es * (3 * h + 2 * hk) + b * h * n * 4 +  # q, out, dout, k, v, lse
                b * n * d * es * (h + 2 * hk) +  # dq, dk, dv
                3 * b * h * n * d * 4)  # fp32 dq accumulator: zero, add, read
    else:
        dram = b * n * d * es * (2 * h + 2 * hk) + b * h * n * 4
    clk = gpu.sms * gpu.clock_ghz * 1e9
    t = {"tensor": flops / (tc_tflops * 1e12),
         "mufu": pairs / (gpu.mufu_lanes * clk),
         "dram": dram / (gpu.hbm_tbps * 1e12)}
    if not backward:
        # FA2's sm80 forward: 128-row tiles, 4 warps of 32 rows, Q in registers, so each B
        # fragment (256 bytes: 2 wavefronts) feeds 2 mma: 1 wavefront per mma, plus the K/V
        # tiles written to shared memory (128 keys per 128-row block pair, 2 x 128 x D bytes).
        nb = math.ceil(n / 128)
        staged = b * h * nb * (nb + 1) // 2 * 2 * 128 * d * es
        t["smem"] = (flops / MMA_FLOPS + staged / 128) / clk
    return dict(tc_flops=flops, dram_bytes=dram, limiter=max(t, key=t.get),
                lower_bound_us=max(t.values()) * 1e6)


def selective_min_flops(s: Shape, backward: bool) -> float:
    """The selective algorithm's own minimum (DESIGN §4, PackGQA): FA2's GEMMs per head plus
    the selection GEMM once per batch element and the pre-pass (forward); backward adds the
    selection GEMM recomputed once and dK_sel, dQ_sel once per batch element."""
    b, n, d, h = s.batch, s.seqlen, s.head_dim, s.heads_q
    pairs = causal_pairs(n)
    if backward:
        return (10 * h + 2 * 3) * d * pairs * b + 2 * d * pairs * b  # + pre-pass
    return (4 * h + 2) * d * pairs * b + 2 * d * pairs * b


# ---- whole calls -----------------------------------------------------------------------------

def prefill_kernels(s: Shape, path: str, backward: bool) -> List[KernelCost]:
    """Launches of one prefill call as launch.cu makes them ('tc' or 'simt' main kernel; with
    TC_PREPASS the tensor-core launchers' pre-pass is the tensor-core one)."""
    ks = list(prepass_tc_costs(s) if path == "tc" and TC_PREPASS else prepass_costs(s))
    if backward:
        ks = bwd_side_costs(s)[:1] + ks + bwd_side_costs(s)[1:2]
        ks.append(tc_bwd_cost(s) if path == "tc" else simt_bwd_cost(s))
        ks += bwd_side_costs(s)[2:]
    else:
        ks.append(tc_fwd_cost(s) if path == "tc" else simt_fwd_cost(s))
    return ks


def prefill_bounds(s: Shape, gpu: Gpu = H100, tc: str = "spec") -> Dict[str, object]:
    """Lower bounds (us) of our fwd / bwd (TC and SIMT paths) and FA2's on shape s.
    tc: 'spec' (dense peak), 'measured' (cuBLAS-class) or 'mma_sync' (2/3 of the peak)."""
    tflops = {"spec": gpu.tc_tflops_spec, "measured": gpu.tc_tflops_measured,
              "mma_sync": gpu.mma_sync_tflops}[tc]
    out: Dict[str, object] = {"shape": s.label, "gpu": gpu.name, "tc_rate": tc}
    for mode, bwd in (("fwd", False), ("bwd", True)):
        fa = fa2_bound(s, gpu, tflops, bwd)
        out[f"fa2_{mode}_us"] = fa["lower_bound_us"]
        for path in ("tc", "simt"):
            ks = [k.finish(gpu, tflops) for k in prefill_kernels(s, path, bwd)]
            tot = sum(k.bound_us["lower_bound"] for k in ks)
            out[f"{path}_{mode}_us"] = tot
            out[f"{path}_{mode}_over_fa2"] = tot / fa["lower_bound_us"]
            main = ks[-1] if not bwd else next(k for k in ks if k.kernel.endswith("_bwd"))
            out[f"{path}_{mode}_main_limiter"] = main.limiter
            out[f"{path}_{mode}_main_us"] = main.bound_us["lower_bound"]
            out[f"{path}_{mode}_flops_over_fa2"] = (
                sum(k.total["tc_flops"] + k.total["simt_flops"] for k in ks) / fa["tc_flops"])
        out[f"min_{mode}_flops_over_fa2"] = selective_min_flops(s, bwd) / fa["tc_flops"]
    return out


# ---- decode ----------------------------------------------------------------------------------

def decode_splits(batch: int, heads_kv: int, ncols: int, sms: int = 132) -> int:
    """Splits per (kv group, sequence) of one decode step: the plan of decode::Workspace
    (csrc/cuda/decode/kernels.cuh), 4 attend CTAs per SM, at least 64 columns per split."""
    want = -(-4 * sms // max(1, batch * heads_kv))
    most = -(-ncols // 64)
    s = max(1, min(want, most))
    cols = -(-(-(-ncols // s)) // 32) * 32
    return -(-ncols // cols)


def decode_step_bytes(batch: int, heads_q: int, heads_kv: int, slots: int, head_dim: int,
                      elem_bytes: int = 2, chunk: int = 1) -> Dict[str, float]:
    """Bytes of one decode step with `slots` cached keys. `ideal`: K and V read once per kv
    head plus F and pos, q, out, the new token's row written; `current`: what the two kernels
    of csrc/cuda/decode request today: attend (one CTA per (split, kv group, sequence) reads
    the group's K/V once; for chunks every group also reads the selection group's keys) writes
    fp32 partial softmax states and the running F, which finish reads back before it commits
    F, pos and the new rows."""
    b, d, es = batch, head_dim, elem_bytes
    kv = 2 * b * heads_kv * slots * d * es
    meta = b * slots * (4 + 8)  # F (fp32) and pos (int64)
    small = b * heads_q * chunk * d * es * 2 + 2 * b * heads_kv * chunk * d * es * 2
    ideal = kv + meta + small
    ncols = slots + chunk
    splits = decode_splits(b, heads_kv, ncols)
    sel_keys = (heads_kv - 1) * b * slots * d * es if chunk > 1 else 0
    run_slices = heads_kv if chunk > 1 else 1
    current = (kv + sel_keys + 2 * meta + small +  # attend reads; finish reads/writes F, pos
               2 * b * heads_q * chunk * splits * (d + 2) * 4 +  # partial states out and in
               2 * b * run_slices * ncols * 4)  # running F out and in
    return dict(ideal_bytes=ideal, current_bytes=current, kv_bytes=kv, splits=splits)


def decode_table(gpu_list: Sequence[Gpu]) -> List[Dict[str, object]]:
    rows = []
    for heads_q, heads_kv in ((8, 8), (32, 8)):
        for b in (1, 8, 16, 64):
            for budget in (512, 1024, 2048, 4096, 8192, 16384):
                slots = budget + 1
                by = decode_step_bytes(b, heads_q, heads_kv, slots, 128)
                row = dict(B=b, Hq=heads_q, Hkv=heads_kv, D=128, budget=budget,
                           ideal_MB=by["ideal_bytes"] / 1e6, current_MB=by["current_bytes"] / 1e6)
                for g in gpu_list:
                    key = g.name.split()[0]
                    row[f"{key}_us"] = by["ideal_bytes"] / (g.hbm_tbps * 1e12) * 1e6
                    row[f"{key}_copy_us"] = by["ideal_bytes"] / (g.copy_tbps * 1e12) * 1e6
                rows.append(row)
    return rows


def decode_full_vs_pruned(n: int = 32768, budget: int = 2048, head_dim: int = 128,
                          heads_q: int = 8, heads_kv: int = 8) -> List[Dict[str, float]]:
    """Bytes of a full-cache step (plain SDPA decode over N keys; the eager selective step
    also reads F) over a pruned step at `budget`, per batch size."""
    rows = []
    for b in (1, 8, 16, 64):
        pruned = decode_step_bytes(b, heads_q, heads_kv, budget + 1, head_dim)["ideal_bytes"]
        full = decode_step_bytes(b, heads_q, heads_kv, n, head_dim)
        full_plain = full["kv_bytes"] + b * heads_q * head_dim * 2 * 2
        rows.append(dict(B=b, N=n, budget=budget, full_MB=full_plain / 1e6,
                         pruned_MB=pruned / 1e6, full_over_pruned=full_plain / pruned))
    return rows


# ---- decode: one chunk step (c > 1), the attend kernel -------------------------------------

# L2 read bandwidth assumed for the re-read K/V (not in the spec sheets; microbenchmarks of
# H100 SXM report about 5.5 TB/s): re-reads are L2 hits, so this, not HBM, prices them.
L2_TBPS = 5.5


@dataclass(frozen=True)
class ChunkStep:
    """One chunk step of a SelectiveKVCache(budget, max_chunk=chunk) that is full: budget
    cached tokens plus `chunk` new ones (slots = budget + chunk, key columns = slots + chunk)."""
    batch: int
    heads_q: int
    heads_kv: int
    budget: int
    chunk: int
    head_dim: int
    elem_bytes: int = 2

    @property
    def label(self) -> str:
        return (f"B{self.batch} H{self.heads_q}/{self.heads_kv} budget {self.budget} "
                f"c {self.chunk} D{self.head_dim}")


def decode_split_plan(batch: int, heads_kv: int, ncols: int, sms: int = 132) -> tuple:
    """(splits, columns per split) as decode::Workspace plans them (kernels.cuh: 4 attend CTAs
    per SM, at least 64 columns per split, boundaries on multiples of 32)."""
    ctas = max(1, batch * heads_kv)
    want = -(-4 * sms // ctas)
    most = -(-ncols // 64)
    s = max(1, min(want, most))
    cps = -(-(-(-ncols // s)) // 32) * 32
    return -(-ncols // cps), cps


def decode_simt_rows(d: int, acc_bytes: int = 4) -> int:
    """Tile<T, D>::kRows: group rows per pass of attend_kernel (4 KiB of fp32 q rows)."""
    return min(16, max(2, 4096 // (d * acc_bytes)))


def _up16(x: int) -> int:
    return -(-x // 16) * 16


def decode_simt_smem(d: int, es: int = 2) -> int:
    """Tile<T, D>::kBytes at 32 columns per tile (what pick_cols gives for 16-bit D <= 128)."""
    rows, cols, rb = decode_simt_rows(d), 32, d * es + 16
    return (2 * 2 * cols * rb + 2 * _up16(rows * d * 4) + 2 * _up16(rows * cols * 4) +
            _up16(cols * 4) + _up16(cols * 8) + _up16(3 * rows * 4))


def decode_tc_smem(d: int, es: int = 2) -> int:
    """TcTile<T, D>::kBytes (tc_attend.cuh): 2 stages x (K, V, K_sel) of 64 rows, Q, Q_sel,
    the fp32 offsets [65][64] and 64 positions."""
    rb = (d + 8) * es
    return 2 * 3 * 64 * rb + 2 * 64 * rb + _up16(65 * 64 * 4) + 64 * 8


def decode_chunk_cost(st: ChunkStep, path: str) -> KernelCost:
    """The attend launch of one chunk step: attend_tc_kernel (tc_attend.cuh, path "tc") or
    attend_kernel (kernels.cuh, "simt"). Grid (splits, Hkv, B), 128 threads; each CTA walks its
    group's c * G rows in passes (64 rows on the tensor cores, Tile::kRows = 8..16 on the SIMT
    path) and streams its column range (K, V, and the selection group's keys outside that
    group) once per pass. Counts per pass and key tile as the code reads; the finish launch
    (merge, commit) is the same for both paths and not included."""
    d, es, g = st.head_dim, st.elem_bytes, st.heads_q // st.heads_kv
    slots = st.budget + st.chunk
    ncols = slots + st.chunk
    splits, cps = decode_split_plan(st.batch, st.heads_kv, ncols)
    valid = (st.budget + st.chunk) / ncols  # empty columns are zero-filled, not read
    rows = st.chunk * g
    w = 4
    # Share of CTAs outside the selection group: they also stream (tc) or fetch (simt) K_sel.
    other = (st.heads_kv - 1) / st.heads_kv
    if path == "tc":
        rows_pass, cols = 64, 64
        ntok = min(64, -(-64 // g))
        planes = 2 + other
        gemm = dict(ldsm=5 * d // 16 * w, mma=8 * d // 16 * w, tc_flops=2 * 64 * 64 * d)
        tile = dict(ldg=planes * 64 * d / 8 / 32, global_load_bytes=planes * 64 * d * es * valid,
                    barriers=4)
        _add(tile, gemm)  # S = Q_sel K_sel^T
        # S to shared memory (32 per thread), the column scan (2 warps, ntok steps), offsets
        # read back per logit, softmax as tc_fwd's, P V.
        _add(tile, dict(sts=32 * w + 2 * ntok, lds=2 * ntok + 32 * w, ffma=2 * ntok + 32 * w))
        _add(tile, gemm)  # Q K^T
        _add(tile, dict(mufu=34 * w, shfl=8 * w, ffma=(32 + 32 + d // 2) * w))
        _add(tile, dict(ldsm=4 * d // 16 * w, mma=8 * d // 16 * w, tc_flops=2 * 64 * 64 * d))
        fixed = dict(ldg=2 * 64 * d / 8 / 32, sts128=2 * 64 * d / 8 / 32,
                     global_load_bytes=2 * 64 * d * es, global_store_bytes=64 * (d + 2) * 4)
        smem, regs = decode_tc_smem(d, es), _regs("decode_attend_tc", d)
    else:
        rows_pass, cols = decode_simt_rows(d), 32
        ntok = min(rows_pass, -(-rows_pass // g) + 1)
        # Per dot of D: D/8 16-byte loads of the key row (32 rows per warp: 4 wavefronts, as
        # ldsm), D/4 of the fp32 q row (one row per warp: broadcast, 1 wavefront), D FMAs.
        def dots(n: float) -> Dict[str, float]:
            return dict(ldsm=n * (d // 8) / 32, lds=n * (d // 4) / 32, ffma=n * d / 32,
                        simt_flops=2 * n * d)
        tile = dict(ldg=2 * cols * d / 8 / 32, global_load_bytes=2 * cols * d * es * valid,
                    barriers=5)
        _add(tile, dots(ntok * cols))  # S
        # Outside the selection group the S dots read K_sel rows from global memory (L1/L2).
        _add(tile, dict(ldg=other * ntok * cols * d / 8 / 32,
                        global_load_bytes=other * ntok * cols * d * es * valid))
        _add(tile, dots(rows_pass * cols))  # logits
        # Offsets: each logit sums the S of the tokens before it in the pass.
        _add(tile, dict(lds=rows_pass * cols * (ntok - 1) / 2 / 32 + 2 * ntok))
        # Online softmax, one warp per row: 2 exp, 10 shuffles.
        _add(tile, dict(mufu=2 * rows_pass, shfl=10 * rows_pass, ffma=4 * rows_pass))
        # P V: per (row, 8-wide slice, column) one probability and one 16-byte V load, 8 FMAs.
        _add(tile, dict(lds=rows_pass * d / 8, ldsm=rows_pass * d / 8,
                        ffma=rows_pass * d, simt_flops=2 * rows_pass * cols * d))
        fixed = dict(ldg=2 * rows_pass * d / 32, sts=2 * rows_pass * d / 32,
                     global_load_bytes=2 * rows_pass * d * es,
                     global_store_bytes=rows_pass * (d + 2) * 4)
        smem, regs = decode_simt_smem(d, es), _regs("decode_attend_simt", d)
    passes = -(-rows // rows_pass)
    per_cta = []
    for sp in range(splits):
        n = min(cps, ncols - sp * cps)
        per_cta.append(passes * -(-n // cols))
    # Unique DRAM bytes, the same for both paths (re-reads hit L2): K/V of every kv head, q,
    # F and pos, the partial states written.
    dram = (2 * st.batch * st.heads_kv * (st.budget + st.chunk) * d * es +
            st.batch * st.heads_q * st.chunk * d * es + st.batch * slots * 12 +
            st.batch * st.heads_q * st.chunk * splits * (d + 2) * 4)
    cost = _grid_cost(f"decode_attend_{path}", 128, smem, _zero(), tile, per_cta,
                      st.batch * st.heads_kv, dram, 0, 1,
                      notes=f"{passes} passes of {rows_pass} rows, {splits} splits of {cps} columns")
    # The fixed part is per pass, not per CTA: add it passes x CTAs times.
    _add(cost.total, fixed, passes * cost.ctas)
    _add(cost.per_cta_max, fixed, passes)
    _add(cost.per_cta_mean, fixed, passes)
    cost.registers = regs
    return cost


def decode_chunk_steps() -> List[ChunkStep]:
    """Issue 13's chunked prefill (budget 1024, chunk 256; D 64 as measured on the CPU, D 128),
    with GQA groups of 1 and 4, and a batched step."""
    return [ChunkStep(1, 8, 8, 1024, 256, 64), ChunkStep(1, 8, 8, 1024, 256, 128),
            ChunkStep(1, 32, 8, 1024, 256, 128), ChunkStep(1, 32, 8, 4096, 256, 128),
            ChunkStep(8, 32, 8, 2048, 64, 128), ChunkStep(1, 32, 8, 1024, 16, 128)]


def decode_chunk_table(gpu: Gpu) -> List[Dict[str, object]]:
    rows = []
    for st in decode_chunk_steps():
        pair = {}
        for path in ("simt", "tc"):
            k = decode_chunk_cost(st, path).finish(gpu, gpu.mma_sync_tflops)
            l2_us = k.total["global_load_bytes"] / (L2_TBPS * 1e12) * 1e6
            pair[path] = max(k.bound_us["lower_bound"], l2_us)
            rows.append(dict(step=st.label, path=path, ctas=k.ctas, smem=k.smem_bytes,
                             regs=k.registers, occ=k.occupancy, plan=k.notes,
                             requested_MB=k.total["global_load_bytes"] / 1e6,
                             dram_MB=k.dram_bytes / 1e6, tc_GFLOP=k.total["tc_flops"] / 1e9,
                             simt_GFLOP=k.total["simt_flops"] / 1e9,
                             pipes_us=k.bound_us["lower_bound"], limiter=k.limiter,
                             l2_us=l2_us, dram_us=k.bound_us["dram"],
                             bound_us=pair[path]))
        rows[-1]["simt_over_tc"] = pair["simt"] / pair["tc"]
    return rows


# ---- report ----------------------------------------------------------------------------------

def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def build_report(shapes: Sequence[Shape], gpu_list: Sequence[Gpu]) -> Dict[str, object]:
    kernels = []
    for s in shapes:
        seen = set()
        for path in ("tc", "simt"):
            for bwd in (False, True):
                for k in prefill_kernels(s, path, bwd):
                    if k.kernel in seen:
                        continue
                    seen.add(k.kernel)
                    k.finish(gpu_list[0], gpu_list[0].tc_tflops_spec)
                    rec = asdict(k)
                    rec["shape"] = s.label
                    kernels.append(rec)
    bounds = [prefill_bounds(s, g, tc) for g in gpu_list for tc in ("spec", "measured", "mma_sync")
              for s in shapes]
    return dict(gpus=[asdict(g) for g in gpu_list], shapes=[asdict(s) for s in shapes],
                kernels=kernels, prefill_bounds=bounds, decode=decode_table(gpu_list),
                decode_full_vs_pruned=decode_full_vs_pruned(),
                decode_chunk=decode_chunk_table(gpu_list[0]))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _table(rows: Sequence[Dict[str, object]], cols: Sequence[str]) -> List[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines


def markdown(report: Dict[str, object], commit: str, date: str) -> str:
    g0 = report["gpus"][0]
    lines = [f"# Roofline of the CUDA kernels: commit {commit}, {date}", "",
             "A cost model, not a measurement (`python bench/roofline.py`): counts from reading "
             "csrc/cuda/prefill and csrc/cuda/decode, lower bounds = slowest pipe at full rate "
             "with perfect overlap. bf16, causal.", ""]
    lines += ["## Per-CTA work of each prefill kernel (longest CTA)", "",
              f"Bounds on {g0['name']} at {g0['tc_tflops_spec']:.0f} TFLOP/s dense, "
              f"{g0['hbm_tbps']} TB/s. smem = shared bytes per CTA; regs = registers per thread "
              "(ptxas, sm_90); occ = CTAs/SM from shared memory, threads and registers; round "
              "trips = synchronous global-load waits of the longest "
              "CTA; wavefronts = 128-byte shared-memory accesses.", ""]
    krows = []
    for k in report["kernels"]:
        m = k["per_cta_max"]
        wave = m["lds"] + m["sts"] + 4 * m["sts128"] + 4 * m["ldsm"]
        krows.append(dict(shape=k["shape"], kernel=k["kernel"], ctas=k["ctas"], smem=k["smem_bytes"],
                          regs=k["registers"] or "?",
                          occ=k["occupancy"], tc_MFLOP=m["tc_flops"] / 1e6,
                          simt_MFLOP=m["simt_flops"] / 1e6, global_KB=(m["global_load_bytes"] +
                                                                        m["global_store_bytes"]) / 1e3,
                          smem_wavefronts=wave, barriers=m["barriers"], shfl=m["shfl"],
                          atomics=m["red"], round_trips=k["round_trips_per_cta"],
                          bound_us=k["bound_us"]["lower_bound"], limiter=k["limiter"]))
    keep = {"B1 H16 N4096 D128", "B1 H32 N8192 D128", "B4 H16 N4096 D64"}
    lines += _table([r for r in krows if r["shape"] in keep],
                    ["shape", "kernel", "ctas", "smem", "regs", "occ", "tc_MFLOP", "simt_MFLOP",
                     "global_KB", "smem_wavefronts", "barriers", "shfl", "atomics",
                     "round_trips", "bound_us", "limiter"])
    lines += ["", "(every shape is in the JSON)", ""]
    lines += ["## Prefill lower bounds against plain causal FlashAttention-2", "",
              "`*_us`: sum of the launches' bounds of one call (pre-pass, main kernel, backward "
              "side kernels). `*_over_fa2`: our bound over FA2's on the same shape; "
              "`min_*_flops_over_fa2`: the selective algorithm's own minimum (selection once per "
              "batch element, PackGQA) — what a kernel could reach; `*_flops_over_fa2`: the "
              "FLOPs our launches compute; `*_main_us`: the main kernel alone (no pre-pass) (tensor + SIMT, masked tile halves included) over FA2's. "
              "FA2's forward bound includes its shared-memory traffic (1 wavefront per mma with "
              "its 32-row warp tiles); its backward bound is tensor/exp/DRAM only. The FA3 paper "
              "measures FA2 at ~35% of the H100's peak: FA2's real time is ~2-3x its bound, so "
              "a kernel at k x FA2's bound that reaches the same fraction of its own bound runs "
              "at k x FA2's time.", ""]
    for tc in ("spec", "measured", "mma_sync"):
        rows = [b for b in report["prefill_bounds"] if b["tc_rate"] == tc]
        if not rows:
            continue
        lines += [f"### tensor rate: {tc}", ""]
        lines += _table(rows, ["gpu", "shape", "fa2_fwd_us", "tc_fwd_us", "tc_fwd_over_fa2",
                               "tc_fwd_flops_over_fa2", "tc_fwd_main_us", "simt_fwd_us", "simt_fwd_over_fa2",
                               "min_fwd_flops_over_fa2", "fa2_bwd_us", "tc_bwd_us",
                               "tc_bwd_over_fa2", "tc_bwd_flops_over_fa2", "tc_bwd_main_us", "simt_bwd_us",
                               "simt_bwd_over_fa2", "min_bwd_flops_over_fa2",
                               "tc_fwd_main_limiter", "tc_bwd_main_limiter"])
        lines.append("")
    pick = [b for b in report["prefill_bounds"] if b["tc_rate"] == "spec"
            and b["gpu"] == g0["name"] and b["shape"] == "B1 H32 N8192 D128"]
    if pick:
        b = pick[0]
        lines += ["## Reading (B=1, Hq=32, N=8K, D=128, bf16, H100 at the dense spec)", "",
                  "Predicted speed relative to FA2 if our kernels reach the same fraction of "
                  "their bound as FA2 does of its own (FA2's backward bound has no shared-memory "
                  "term, so the backward ratios are pessimistic):", ""]
        for path in ("tc", "simt"):
            for mode in ("fwd", "bwd"):
                lines.append(
                    f"- {path} {mode}: bound {b[f'{path}_{mode}_us']:.0f} us = "
                    f"{b[f'{path}_{mode}_over_fa2']:.2f}x FA2's {b[f'fa2_{mode}_us']:.0f} us "
                    f"(main kernel {b[f'{path}_{mode}_main_us']:.0f} us, limited by "
                    f"{b[f'{path}_{mode}_main_limiter']}; {b[f'{path}_{mode}_flops_over_fa2']:.2f}x "
                    f"FA2's FLOPs, the algorithm's minimum {b[f'min_{mode}_flops_over_fa2']:.2f}x)")
        lines += ["", "What a GPU run (bench/gpu_check.sh -> prefill_paths) must confirm: the "
                  "measured percentages of these bounds; that shared-memory wavefronts, not the "
                  "tensor pipe, limit the tensor-core kernels (ncu: l1tex data-pipe lsu "
                  "wavefronts vs. pipe_tensor); the exposed latency of the backward's synchronous "
                  "tile loads at 1-2 CTAs/SM (registers 250+, see regs/occ above) and whether "
                  "the forward's cp.async loads, one step ahead, hide theirs.", ""]
    lines += ["## Decode: bytes per step and the bandwidth-bound time", "",
              "One new token (chunk 1), D=128, slots = budget + 1. `ideal`: K/V once per kv "
              "head + F, pos, q, out; `current`: what the kernels of csrc/cuda/decode request "
              "(K/V once per kv group, plus the split-KV partial states and the running F in the "
              "workspace). `*_us` at spec HBM bandwidth, `*_copy_us` at the measured "
              "copy bandwidth (read+write bytes / time: the DRAM rate a streaming kernel gets). A step is 2 launches: below ~10 us launch latency "
              "dominates.", ""]
    dcols = list(report["decode"][0].keys())
    lines += _table(report["decode"], dcols)
    lines += ["", "### Full cache vs pruned at N = 32K, budget 2K (bytes per step)", ""]
    lines += _table(report["decode_full_vs_pruned"],
                    list(report["decode_full_vs_pruned"][0].keys()))
    if report.get("decode_chunk"):
        lines += ["", "### Chunked prefill: the attend launch of one chunk step, SIMT vs tensor "
                  "cores", "",
                  f"{g0['name']}, mma.sync at 2/3 of the dense spec, bf16. A full cache "
                  "(budget tokens + c new). Both paths move the same unique DRAM bytes "
                  "(`dram_MB`); they differ in how often each CTA re-reads its K/V columns "
                  "(once per pass: 64 group rows on the tensor cores, Tile::kRows = 16 at D 64, "
                  "8 at D 128 on the SIMT path), which is `requested_MB` (L2 hits), and in the "
                  "pipe doing the math. `pipes_us`: slowest SM pipe or DRAM; `l2_us`: requested "
                  f"bytes at an assumed {L2_TBPS} TB/s of L2; `bound_us` = the larger; "
                  "`simt_over_tc`: the predicted speed-up of the tensor-core kernel. The finish "
                  "launch (merge, commit) is the same for both and not included. No GPU timing "
                  "exists yet (bench/gpu_check.sh). At c = 256 most of `dram_MB` is the fp32 "
                  "partial states (B Hq c splits (D + 2) 4 bytes, read again by the finish "
                  "launch), not K/V: decode::Workspace sizes the split plan for c = 1 (4 CTAs "
                  "per SM); for chunks, whose c G rows already give each CTA work, fewer splits "
                  "would cut that traffic (not done).", ""]
        lines += _table(report["decode_chunk"],
                        ["step", "path", "ctas", "smem", "regs", "occ", "plan", "requested_MB",
                         "dram_MB", "tc_GFLOP", "simt_GFLOP", "pipes_us", "limiter", "l2_us",
                         "bound_us", "simt_over_tc"])
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--gpus", default="h100,h200")
    ap.add_argument("--print", action="store_true", help="also print the markdown")
    args = ap.parse_args(argv)
    gpu_list = [GPUS[g] for g in args.gpus.split(",")]
    report = build_report(report_shapes(), gpu_list)
    commit, date = _git_commit(), _dt.date.today().isoformat()
    report["meta"] = dict(commit=commit, date=date)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"roofline_{date}_{commit}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report, commit, date)
    with open(stem + ".md", "w") as f:
        f.write(md)
    if args.print:
        print(md)
    print(f"wrote {stem}.json / .md")


if __name__ == "__main__":
    main()
