"""Calls every CUDA kernel of selattn_ext once on small, odd-sized inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 9 python3 bench/cuda_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python3 bench/cuda_sanitize.py

Covers the prefill forward and backward (every dtype; head dims 1..256 across the SIMT chunk
sizes; N not a multiple of the 32/64-row tiles; GQA; a transposed (B, N, H, D) layout; dlse
given and null; for bf16/fp16 at head dims 32/64/96/128 both the tensor-core and the SIMT
forward, and the SIMT (opt-out) and the default tensor-core backward; several workspace
superchunks (SELATTN_CUDA_SUPERCHUNK_BLOCKS=4); the memory-loss output mem (mem_tau)
and its gradient dmem on some of these) and, when the op library has a CUDA decode kernel, token-by-token decoding and
chunked prefill through the pruned cache. As a cheap smoke check it also compares every result
with selattn_ext.reference (fp64) and fails on NaN/inf or a large error; the real accuracy
tests are python_tests (-m cuda). Exit status 1 on any failure.
"""

from __future__ import annotations

import os
import sys

import torch

import selattn_ext
from selattn_ext import reference

# The device is overridable only to check this script's own logic against the CPU kernels.
DEV = os.environ.get("SELATTN_SANITIZE_DEVICE", "cuda")


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


# Loose smoke tolerances relative to max|reference| (python_tests holds the strict ones).
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2.5e-2, torch.float16: 5e-3}

failures = []


def check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    got64 = got.double().cpu()
    want = want.cpu()
    if not torch.isfinite(got64).all():
        failures.append(f"{name}: non-finite values")
        print(f"FAIL {name}: non-finite values")
        return
    err = (got64 - want).abs().max().item()
    ref = want.abs().max().item()
    ok = err <= TOL[dtype] * (ref + 1.0)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max|err| {err:.3e} (max|ref| {ref:.3e})")
    if not ok:
        failures.append(f"{name}: max|err| {err:.3e}")


def prefill_case(dtype, b, hq, hkv, n, d, transposed=False, with_dlse=True, sel_head=0,
                 mem_tau=None):
    name = f"prefill {str(dtype)[6:]} B{b} Hq{hq} Hkv{hkv} N{n} D{d}" + (" bnhd" if transposed else "") + (
        "" if with_dlse else " dlse=None") + (f" sel_head{sel_head}" if sel_head else "") + (
        f" mem_tau{mem_tau:g}" if mem_tau is not None else "")
    # Inputs and the fp64 oracle live on the CPU: under the sanitizers only our kernels (and a
    # few copies) run on the GPU, which keeps the instrumented run short.
    g = torch.Generator().manual_seed(n * 1000 + d)

    def rnd(*shape):
        # std 1.5 inputs: logit std ~2, so F reaches well above 1 within a few dozen rows.
        return 1.5 * torch.randn(*shape, dtype=torch.float64, generator=g)

    if transposed:  # (B, N, H, D) storage seen as (B, H, N, D): non-contiguous head/row strides
        q64 = rnd(b, n, hq, d).transpose(1, 2)
        k64 = rnd(b, n, hkv, d).transpose(1, 2)
        v64 = rnd(b, n, hkv, d).transpose(1, 2)
    else:
        q64, k64, v64 = rnd(b, hq, n, d), rnd(b, hkv, n, d), rnd(b, hkv, n, d)
    dout64 = rnd(b, hq, n, d)
    dlse64 = rnd(b, hq, n) if with_dlse else None
    dmem64 = rnd(b, n) if mem_tau is not None else None
    scale = d ** -0.5

    # Oracle in fp64 (from the same rounded inputs the kernel sees).
    leaves = [t.to(dtype).double().requires_grad_() for t in (q64, k64, v64)]
    out_ref, lse_ref = reference.attention(*leaves, scale=scale, sel_head=sel_head, return_lse=True)
    loss = (out_ref * dout64.to(dtype).double()).sum()
    if with_dlse:
        loss = loss + (lse_ref * dlse64).sum()
    if mem_tau is not None:
        # The raw op's mem is the row sum R[b, i] = sum_{j <= i} min(F[b, i, j], mem_tau).
        f_ref = reference.accumulated_selection(*reference.selection_inputs(*leaves[:2], sel_head),
                                                scale)
        mem_ref = reference.memory_rowsum(f_ref, mem_tau)
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        if not ((f_ref[:, tril] > mem_tau).any() and (f_ref[:, tril] < mem_tau).any()):
            failures.append(f"{name}: the clip at mem_tau is inactive; change mem_tau")
        loss = loss + (mem_ref * dmem64).sum()
    loss.backward()

    # .to(DEV) keeps the (B, N, H, D) strides of the transposed case.
    q, k, v = (t.to(dtype).to(DEV) for t in (q64, k64, v64))
    q_sel, k_sel = reference.selection_inputs(q, k, sel_head)
    # bf16/fp16 at head dims 32/64/96/128 take the tensor-core forward by default; run the SIMT
    # forward too (the launcher reads SELATTN_CUDA_FORCE_SIMT at every call).
    has_tc = dtype in (torch.bfloat16, torch.float16) and d in (32, 64, 96, 128)
    for force_simt in ((False, True) if has_tc else (False,)):
        os.environ["SELATTN_CUDA_FORCE_SIMT"] = "1" if force_simt else "0"
        try:
            res = selattn_ext.ops.prefill_fwd(q, k, v, q_sel, k_sel, scale, mem_tau)
            sync()
            out, lse = res[:2]
        finally:
            os.environ.pop("SELATTN_CUDA_FORCE_SIMT")
        path = " [simt fwd]" if force_simt else (" [tc fwd]" if has_tc else "")
        check(name + path + " out", out, out_ref.detach(), dtype)
        check(name + path + " lse", lse, lse_ref.detach(), dtype)
        if mem_tau is not None:
            # Accumulated in fp32 (fp64) from the same F as the attention: the fp32 tolerance.
            check(name + path + " mem", res[2], mem_ref.detach(),
                  torch.float64 if dtype == torch.float64 else torch.float32)

    dout = dout64.to(dtype).to(DEV)
    stats = lse.dtype
    dlse = dlse64.to(stats).to(DEV) if with_dlse else None
    dmem = dmem64.to(stats).to(DEV) if mem_tau is not None else None
    # The tensor-core backward is the default (SELATTN_CUDA_TC_BWD=0 opts out): run both.
    for tc_bwd in ((False, True) if has_tc else (False,)):
        os.environ["SELATTN_CUDA_TC_BWD"] = "1" if tc_bwd else "0"
        try:
            dq, dk, dv, dq_sel, dk_sel = selattn_ext.ops.prefill_bwd(
                dout, q, k, v, q_sel, k_sel, out, lse, dlse, scale, dmem, mem_tau)
            sync()
        finally:
            os.environ.pop("SELATTN_CUDA_TC_BWD")
        # Selection inputs are views of q and k: their gradients add into those heads.
        sh = sel_head % hq
        dq = dq.clone()
        dk = dk.clone()
        dq[:, sh] += dq_sel
        dk[:, sh * hkv // hq] += dk_sel
        path = " [tc bwd]" if tc_bwd else (" [simt bwd]" if has_tc else "")
        check(name + path + " dq", dq, leaves[0].grad, dtype)
        check(name + path + " dk", dk, leaves[1].grad, dtype)
        check(name + path + " dv", dv, leaves[2].grad, dtype)


def decode_cases():
    # Only with a CUDA decode kernel (the decode issue may not have landed yet).
    has_op = hasattr(torch.ops.selattn, "decode_step")
    has_cuda = has_op and torch._C._dispatch_has_kernel_for_dispatch_key("selattn::decode_step", DEV.upper())
    if not has_cuda:
        print(f"decode: skipped (decode_step op: {has_op}, {DEV} kernel: {has_cuda})")
        return
    from selattn_ext.cache import SelectiveKVCache, decode

    for dtype, d, chunk in ((torch.float32, 64, 1), (torch.bfloat16, 128, 3), (torch.float64, 16, 2)):
        b, hq, hkv, n = 2, 4, 2, 23
        g = torch.Generator().manual_seed(7 + d)
        q, k, v = (1.5 * torch.randn(b, h, n, d, dtype=torch.float64, generator=g)
                   for h in (hq, hkv, hkv))
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        want = reference.attention(q.double(), k.double(), v.double())
        q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
        # budget >= n: no eviction, so decoding reproduces the prefill output.
        cache = SelectiveKVCache(b, hkv, d, n, max_chunk=chunk, dtype=dtype, device=DEV)
        outs = [decode(q[:, :, s:s + chunk], k[:, :, s:s + chunk], v[:, :, s:s + chunk], cache)
                for s in range(0, n, chunk)]
        sync()
        check(f"decode {str(dtype)[6:]} D{d} chunk{chunk}", torch.cat(outs, dim=2), want, dtype)
        # Small budget and a threshold: eviction paths; only finiteness can be checked cheaply.
        cache = SelectiveKVCache(b, hkv, d, 5, max_chunk=chunk, tau=2.0, dtype=dtype, device=DEV)
        for s in range(0, n, chunk):
            out = decode(q[:, :, s:s + chunk], k[:, :, s:s + chunk], v[:, :, s:s + chunk], cache)
            if not torch.isfinite(out.double()).all():
                failures.append(f"decode evicting {dtype} D{d}: non-finite output")
        sync()
        print(f"ok   decode evicting {str(dtype)[6:]} D{d} chunk{chunk} ran")


def main() -> int:
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if DEV == 'cuda' else DEV}")
    cases = [
        # dtype, B, Hq, Hkv, N, D  (N odd / not a multiple of 32; every head-dim chunk count)
        (torch.float32, 1, 2, 1, 37, 64),
        (torch.float32, 2, 3, 3, 65, 96, True),
        (torch.float32, 1, 1, 1, 5, 1),
        (torch.float64, 1, 2, 1, 45, 16),
        (torch.float64, 1, 2, 2, 33, 200),
        (torch.bfloat16, 2, 4, 2, 70, 128),
        (torch.bfloat16, 1, 2, 2, 40, 256, False, False),
        (torch.float16, 1, 2, 2, 33, 32),
        (torch.float16, 1, 4, 1, 97, 80, True, True),
        # tensor-core forward shapes: several 64-row query blocks, GQA, transposed layout
        (torch.bfloat16, 2, 4, 1, 130, 64),
        (torch.float16, 1, 2, 2, 129, 96, True),
        (torch.bfloat16, 1, 2, 2, 64, 32),
    ]
    # Memory loss (mem_tau, dmem): summed / added by the head-0 CTAs only, so GQA and a
    # selection head other than 0 check that it counts once; SIMT (fp32, fp64, D 80) and
    # tensor-core (bf16/fp16 D 64/96) kernels, rows past N in the last block.
    mem_cases = [
        # dtype, B, Hq, Hkv, N, D, transposed, with_dlse, sel_head, mem_tau
        (torch.float32, 2, 4, 2, 45, 32, False, True, 1, 1.0),
        (torch.float64, 1, 3, 1, 37, 16, True, False, 0, 0.5),
        (torch.bfloat16, 1, 4, 2, 130, 64, False, True, 2, 1.0),
        (torch.float16, 2, 2, 1, 97, 96, True, True, 0, 2.0),
        (torch.float16, 1, 2, 2, 70, 80, False, True, 1, 1.0),
    ]
    for c in cases + mem_cases:
        try:
            prefill_case(*c)
        except Exception as e:  # record and continue: later kernels still get sanitized
            failures.append(f"prefill {c}: {type(e).__name__}: {e}")
            print(f"FAIL prefill {c}: {type(e).__name__}: {e}")
    # The bounded workspace with several superchunks (128 query rows each here): the carry, the
    # backward's walk down the superchunks and the dF suffix sums handed between launches.
    os.environ["SELATTN_CUDA_SUPERCHUNK_BLOCKS"] = "4"
    try:
        for c in ((torch.bfloat16, 2, 4, 2, 150, 64, False, True, 1, 1.0),
                  (torch.float32, 1, 2, 1, 97, 40, False, True, 0, 1.0)):
            try:
                prefill_case(*c)
            except Exception as e:
                failures.append(f"prefill superchunks {c}: {type(e).__name__}: {e}")
                print(f"FAIL prefill superchunks {c}: {type(e).__name__}: {e}")
    finally:
        os.environ.pop("SELATTN_CUDA_SUPERCHUNK_BLOCKS")
    try:
        decode_cases()
    except Exception as e:
        failures.append(f"decode: {type(e).__name__}: {e}")
        print(f"FAIL decode: {type(e).__name__}: {e}")
    print(f"cuda_sanitize: {len(failures)} failure(s)")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
