"""CPU emulation of the tensor-core backward (csrc/cuda/prefill_tc_bwd.cuh), lane by lane.

Same fragment model as tc_fwd_fragments.py (ldmatrix / mma.m16n8k16 from the PTX ISA); every
address, fragment index, scan and mask below is the kernel's own formula. One CTA per (key
block of 64 keys, head); warp w owns keys 16w..16w+15 of the block and computes transposed tiles
(keys x query rows), so F's cumsum and dS's suffix sum run along each thread's own fragment
columns. Compared with autograd through selattn_ext.reference in fp64 (no bf16 rounding).
dK is accumulated in "registers" here; from head dim 96 on the kernel keeps it in shared memory
with the same per-thread fragment ownership as dKsel (tc_accumulate_xt_y_smem), same sums.
With mem_tau, head 0 folds the memory-loss term (-dmem[i] where F < mem_tau, j <= i) into the
suffix sum behind dA^T from the below_tau bit mask, as the kernel does.
Run: python tools/cuda_emulation/prefill/tc_bwd_fragments.py
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from selattn_ext import reference  # noqa: E402
from tc_fwd_fragments import gemm_xyt, ldmatrix_x4, mma, sel_score  # noqa: E402

BM = BN = 64
WARPS = 4
LANES = np.arange(32)
G, TT = LANES // 4, LANES % 4


def shfl(x, src):  # x (32,), src (32,) lane indices
    return x[src]


def shfl_up(x, delta):
    src = np.where(LANES - delta >= 0, LANES - delta, LANES)
    return x[src]


def shfl_down(x, delta):
    src = np.where(LANES + delta < 32, LANES + delta, LANES)
    return x[src]


def repack_a(frag, kk):
    """A fragment (rows of the C fragments x 16 columns) from C fragments 2kk, 2kk+1."""
    a = np.zeros((32, 4, 2))
    a[:, 0] = frag[2 * kk][:, 0:2]
    a[:, 1] = frag[2 * kk][:, 2:4]
    a[:, 2] = frag[2 * kk + 1][:, 0:2]
    a[:, 3] = frag[2 * kk + 1][:, 2:4]
    return a


def accumulate_xt_y(acc, frag, s_y, D):
    """acc (D/8 C fragments, 16 keys x D) += frag^T-tile (16 keys x 64 rows) @ Y (64 rows x D)."""
    for kk in range(4):
        a = repack_a(frag, kk)
        for dn in range(D // 16):
            b = ldmatrix_x4(s_y, lambda L: (kk * 16 + (L % 8) + 8 * ((L // 8) % 2), dn * 16 + 8 * (L // 16)), True)
            mma(acc[2 * dn], a, b[:, 0], b[:, 1])
            mma(acc[2 * dn + 1], a, b[:, 2], b[:, 3])


def run(N, D, Hq, Hkv, seed=0, mem_tau=None):
    g = torch.Generator().manual_seed(seed)
    q = 1.5 * torch.randn(Hq, N, D, dtype=torch.float64, generator=g)
    k = 1.5 * torch.randn(Hkv, N, D, dtype=torch.float64, generator=g)
    v = 1.5 * torch.randn(Hkv, N, D, dtype=torch.float64, generator=g)
    qs = 1.5 * torch.randn(N, D, dtype=torch.float64, generator=g)
    ks = 1.5 * torch.randn(N, D, dtype=torch.float64, generator=g)
    dout = torch.randn(Hq, N, D, dtype=torch.float64, generator=g)
    dlse = torch.randn(Hq, N, dtype=torch.float64, generator=g)
    dmem = torch.randn(N, dtype=torch.float64, generator=g)
    scale = D ** -0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v, qs, ks)]
    out, lse = reference.attention(leaves[0][None], leaves[1][None], leaves[2][None], scale=scale,
                                   q_sel=leaves[3][None], k_sel=leaves[4][None], return_lse=True)
    loss = (out[0] * dout).sum() + (lse[0] * dlse).sum()
    if mem_tau is not None:  # the raw op's mem: R = sum_{j <= i} min(F, mem_tau)
        f_ref = reference.accumulated_selection(leaves[3][None], leaves[4][None], scale)
        assert (f_ref > mem_tau).any() and (f_ref.tril() < mem_tau).any(), "clip inactive"
        loss = loss + (reference.memory_rowsum(f_ref, mem_tau)[0] * dmem).sum()
    loss.backward()
    out, lse = out[0].detach().numpy(), lse[0].detach().numpy()
    q, k, v, qs, ks, dout, dlse, dmem = (t.numpy() for t in (q, k, v, qs, ks, dout, dlse, dmem))

    A = scale * qs @ ks.T
    ii, jj = np.arange(N)[:, None], np.arange(N)[None, :]
    S = np.where((jj >= 1) & (jj < ii) & (A > 0), A, 0.0)
    nqb32 = (N + 31) // 32
    poff = np.array([S[:b * 32].sum(0) for b in range(nqb32)])
    Dl = (dout * out).sum(-1) - dlse
    dq = np.zeros_like(q); dk = np.zeros_like(k); dv = np.zeros_like(v)
    dqs = np.zeros_like(qs); dks = np.zeros_like(ks)

    def pad(x, r0, rows=64):
        o = np.zeros((rows, D + 8)); r = max(0, min(rows, x.shape[0] - r0))
        o[:r, :D] = x[r0:r0 + r]; return o

    nqb = (N + BM - 1) // BM
    grp = Hq // Hkv
    for h in range(Hq):
        hk = h // grp
        for kb in range((N + BN - 1) // BN):
            col0 = kb * BN
            s_k, s_ks, s_v = pad(k[hk], col0), pad(ks, col0), pad(v[hk], col0)
            dv_acc = np.zeros((WARPS, D // 8, 32, 4)); dk_acc = np.zeros((WARPS, D // 8, 32, 4))
            s_dks = np.zeros((BN, D))
            dl_suffix = np.zeros((WARPS, 32, 2))
            for qb in range(nqb - 1, kb - 1, -1):
                row0 = qb * BM
                s_q, s_qs, s_do = pad(q[h], row0), pad(qs, row0), pad(dout[h], row0)
                s_lse = np.array([lse[h, r] if r < N else 0.0 for r in range(row0, row0 + BM)])
                s_dl = np.array([Dl[h, r] if r < N else 0.0 for r in range(row0, row0 + BM)])
                add_mem = h == 0 and mem_tau is not None
                s_dmem = np.array([dmem[r] if r < N else 0.0 for r in range(row0, row0 + BM)])
                s_dlt = np.zeros((BN, BM + 8)); s_dat = np.zeros((BN, BM + 8))
                for w in range(WARPS):
                    key_lo = col0 + w * 16 + G
                    keys = (key_lo, key_lo + 8)
                    # selection (transposed: rows of the fragment are keys, columns query rows)
                    f = gemm_xyt(s_ks, s_qs, w, D)
                    mask = np.zeros((8, 32, 4), dtype=bool)
                    for rh in range(2):
                        carry = np.array([poff[row0 // 32, kk] if kk < N else 0.0 for kk in keys[rh]])
                        for nt in range(8):
                            i0 = row0 + nt * 8 + 2 * TT
                            x0 = np.array([sel_score(scale * f[nt, L, 2 * rh], i0[L], keys[rh][L], N) for L in range(32)])
                            x1 = np.array([sel_score(scale * f[nt, L, 2 * rh + 1], i0[L] + 1, keys[rh][L], N) for L in range(32)])
                            mask[nt, :, 2 * rh] = x0 > 0; mask[nt, :, 2 * rh + 1] = x1 > 0
                            pair = x0 + x1
                            inc = pair.copy()
                            for off in (1, 2):
                                y = shfl_up(inc, off)
                                inc = np.where(TT >= off, inc + y, inc)
                            exc = shfl_up(inc, 1); exc = np.where(TT == 0, 0.0, exc)
                            f[nt, :, 2 * rh] = carry + exc
                            f[nt, :, 2 * rh + 1] = carry + exc + x0
                            carry = carry + shfl(inc, G * 4 + 3)
                    # P^T and dL^T
                    sc = gemm_xyt(s_k, s_q, w, D)
                    dp = gemm_xyt(s_v, s_do, w, D)
                    pt = np.zeros((8, 32, 4)); dlt = np.zeros((8, 32, 4))
                    below_tau = np.zeros((8, 32, 4), dtype=bool)
                    for nt in range(8):
                        for c in range(4):
                            key = keys[c // 2]
                            rl = nt * 8 + 2 * TT + (c % 2)
                            i = row0 + rl
                            valid = (i < N) & (key <= i)
                            with np.errstate(over="ignore"):
                                p = np.where(valid, np.exp(np.where(valid, scale * sc[nt, :, c] - f[nt, :, c] - s_lse[rl], 0)), 0.0)
                            pt[nt, :, c] = p
                            below_tau[nt, :, c] = add_mem & valid & (f[nt, :, c] < (mem_tau or 0.0))
                            dlt[nt, :, c] = np.where(valid, p * (dp[nt, :, c] - s_dl[rl]), 0.0)
                    accumulate_xt_y(dv_acc[w], pt, s_do, D)
                    accumulate_xt_y(dk_acc[w], dlt, s_q, D)
                    # dA^T: suffix of dL over later rows, walking the columns backwards
                    dat = np.zeros((8, 32, 4))
                    for rh in range(2):
                        carry = dl_suffix[w, :, rh].copy()
                        for nt in range(7, -1, -1):
                            rl0 = nt * 8 + 2 * TT
                            y0 = dlt[nt, :, 2 * rh] - np.where(below_tau[nt, :, 2 * rh], s_dmem[rl0], 0.0)
                            y1 = dlt[nt, :, 2 * rh + 1] - np.where(below_tau[nt, :, 2 * rh + 1], s_dmem[rl0 + 1], 0.0)
                            pair = y0 + y1
                            inc = pair.copy()  # inclusive over t' >= t
                            for off in (1, 2):
                                y = shfl_down(inc, off)
                                inc = np.where(TT + off <= 3, inc + y, inc)
                            exc = shfl_down(inc, 1); exc = np.where(TT == 3, 0.0, exc)
                            dat[nt, :, 2 * rh + 1] = np.where(mask[nt, :, 2 * rh + 1], -(carry + exc), 0.0)
                            dat[nt, :, 2 * rh] = np.where(mask[nt, :, 2 * rh], -(carry + exc + y1), 0.0)
                            carry = carry + shfl(inc, G * 4)
                        dl_suffix[w, :, rh] = carry
                    # dK_sel += dA^T Q_sel, accumulated in shared memory one d-pair at a time
                    for dn in range(D // 16):
                        tmp = np.zeros((2, 32, 4))
                        for kk in range(4):
                            a = repack_a(dat, kk)
                            b = ldmatrix_x4(s_qs, lambda L: (kk * 16 + (L % 8) + 8 * ((L // 8) % 2), dn * 16 + 8 * (L // 16)), True)
                            mma(tmp[0], a, b[:, 0], b[:, 1]); mma(tmp[1], a, b[:, 2], b[:, 3])
                        for half in range(2):
                            for L in range(32):
                                d = (2 * dn + half) * 8 + 2 * TT[L]
                                kl = w * 16 + G[L]
                                s_dks[kl, d:d + 2] += tmp[half, L, 0:2]
                                s_dks[kl + 8, d:d + 2] += tmp[half, L, 2:4]
                    # dL^T, dA^T to shared memory as [key][row]
                    for nt in range(8):
                        for L in range(32):
                            kl = w * 16 + G[L]; rl = nt * 8 + 2 * TT[L]
                            s_dlt[kl, rl:rl + 2] = dlt[nt, L, 0:2]; s_dlt[kl + 8, rl:rl + 2] = dlt[nt, L, 2:4]
                            s_dat[kl, rl:rl + 2] = dat[nt, L, 0:2]; s_dat[kl + 8, rl:rl + 2] = dat[nt, L, 2:4]
                # __syncthreads(); dQ, dQ_sel with warps over query rows
                for w in range(WARPS):
                    for src, s_b, dst in ((s_dlt, s_k, None), (s_dat, s_ks, None)):
                        for dn in range(D // 16):
                            tmp = np.zeros((2, 32, 4))
                            for kk in range(4):
                                a = ldmatrix_x4(src, lambda L: (kk * 16 + (L % 8) + 8 * (L // 16), w * 16 + 8 * ((L // 8) % 2)), True)
                                b = ldmatrix_x4(s_b, lambda L: (kk * 16 + (L % 8) + 8 * ((L // 8) % 2), dn * 16 + 8 * (L // 16)), True)
                                mma(tmp[0], a, b[:, 0], b[:, 1]); mma(tmp[1], a, b[:, 2], b[:, 3])
                            for half in range(2):
                                for L in range(32):
                                    d = (2 * dn + half) * 8 + 2 * TT[L]
                                    for rh in range(2):
                                        i = row0 + w * 16 + G[L] + 8 * rh
                                        if i < N:
                                            target = dq[h] if src is s_dlt else dqs
                                            target[i, d:d + 2] += scale * tmp[half, L, 2 * rh:2 * rh + 2]
            for w in range(WARPS):
                for L in range(32):
                    for rh in range(2):
                        j = col0 + w * 16 + G[L] + 8 * rh
                        if j >= N:
                            continue
                        for dt in range(D // 8):
                            d = dt * 8 + 2 * TT[L]
                            dv[hk, j, d:d + 2] += dv_acc[w, dt, L, 2 * rh:2 * rh + 2]
                            dk[hk, j, d:d + 2] += scale * dk_acc[w, dt, L, 2 * rh:2 * rh + 2]
            for kl in range(BN):
                if col0 + kl < N:
                    dks[col0 + kl] += scale * s_dks[kl]
    for name, got, leaf in zip(("dq", "dk", "dv", "dq_sel", "dk_sel"), (dq, dk, dv, dqs, dks), leaves):
        err = np.abs(got - leaf.grad.numpy()).max()
        print(f"N={N} D={D} Hq={Hq} Hkv={Hkv} mem_tau={mem_tau} {name}: max|err| {err:.2e} (max {np.abs(leaf.grad.numpy()).max():.2e})")
        assert err < 1e-9, name


if __name__ == "__main__":
    run(70, 16, 2, 1)
    run(130, 32, 1, 1)
    run(100, 16, 2, 1, mem_tau=1.0)
