"""CPU emulation of the tensor-core forward (csrc/cuda/prefill_tc_fwd.cuh), lane by lane.

ldmatrix / mma.m16n8k16 are modelled from the PTX ISA fragment layouts, and every address and
fragment index below is the kernel's own formula; the result is compared with
selattn_ext.reference in fp64. It checks the index math and the shuffle scan without a GPU (not
the hardware, not rounding). With mem_tau it also emulates the memory-loss row sums (head 0's
mem_part per lane, the 4-lane reduction) against reference.memory_rowsum.
Run: python tools/cuda_emulation/prefill/tc_fwd_fragments.py
Keep it in step with the kernel when the kernel changes.
"""
import numpy as np
import torch
import os
import sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from selattn_ext import reference

BM = BN = 64
WARPS = 4


def ldmatrix_x4(smem, addr, trans):
    """addr(lane) -> (row, col) start of the 8-element row that lane supplies."""
    regs = np.zeros((32, 4, 2))
    for m in range(4):
        M = np.array([smem[addr(8 * m + r)[0], addr(8 * m + r)[1]:addr(8 * m + r)[1] + 8] for r in range(8)])
        for L in range(32):
            g, t = L // 4, L % 4
            regs[L, m] = M[g, 2 * t:2 * t + 2] if not trans else [M[2 * t, g], M[2 * t + 1, g]]
    return regs


def mma(c, a, b0, b1):
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for L in range(32):
        g, t = L // 4, L % 4
        A[g, 2*t:2*t+2] = a[L, 0]; A[g+8, 2*t:2*t+2] = a[L, 1]
        A[g, 2*t+8:2*t+10] = a[L, 2]; A[g+8, 2*t+8:2*t+10] = a[L, 3]
        B[2*t:2*t+2, g] = b0[L]; B[2*t+8:2*t+10, g] = b1[L]
    C = A @ B
    for L in range(32):
        g, t = L // 4, L % 4
        c[L, 0:2] += C[g, 2*t:2*t+2]; c[L, 2:4] += C[g+8, 2*t:2*t+2]


def gemm_xyt(sx, sy, warp, D):
    acc = np.zeros((8, 32, 4))
    for ks in range(D // 16):
        a = ldmatrix_x4(sx, lambda L: (warp * 16 + (L % 8) + 8 * ((L // 8) % 2), ks * 16 + 8 * (L // 16)), False)
        for np_ in range(4):
            b = ldmatrix_x4(sy, lambda L: (np_ * 16 + (L % 8) + 8 * (L // 16), ks * 16 + 8 * ((L // 8) % 2)), False)
            mma(acc[2 * np_], a, b[:, 0], b[:, 1])
            mma(acc[2 * np_ + 1], a, b[:, 2], b[:, 3])
    return acc


def sel_score(a, i, j, n):
    return a if (i < n and j >= 1 and j < i and a > 0) else 0.0


def shfl_up(x, delta):  # x (32,)
    y = x.copy()
    for L in range(32):
        if L - delta >= 0:
            y[L] = x[L - delta]
    return y


def run(N, D, seed=0, mem_tau=None):
    rng = np.random.default_rng(seed)
    q, k, v, qs, ks_ = (1.5 * rng.standard_normal((N, D)) for _ in range(5))
    scale = D ** -0.5
    # Poff from the definition (32-row blocks)
    A = scale * qs @ ks_.T
    S = np.array([[sel_score(A[i, j], i, j, N) for j in range(N)] for i in range(N)])
    nqb32 = (N + 31) // 32
    poff = np.array([S[:qb * 32].sum(0) for qb in range(nqb32)])

    def pad(x, rows):
        out = np.zeros((rows, D + 8)); r = min(rows, x.shape[0]); out[:r, :D] = x[:r]; return out

    out = np.zeros((N, D)); lse = np.zeros(N); mem = np.zeros(N)
    nqb = (N + BM - 1) // BM
    for qb in range(nqb):
        row0 = qb * BM
        last_row = min(row0 + BM - 1, N - 1)
        s_q = pad(q[row0:], BM); s_qsel = pad(qs[row0:], BM)
        o = np.zeros((WARPS, D // 8, 32, 4)); m = np.full((WARPS, 32, 2), -np.inf); l = np.zeros((WARPS, 32, 2))
        mem_part = np.zeros((WARPS, 32, 2))
        for col0 in range(0, last_row + 1, BN):
            s_k = pad(k[col0:], BN); s_ks = pad(ks_[col0:], BN); s_v = pad(v[col0:], BN)
            warp_tot = np.zeros((WARPS, BN))
            fs = []
            for w in range(WARPS):
                f = gemm_xyt(s_qsel, s_ks, w, D)
                for nt in range(8):
                    for c in range(2):
                        s_lo = np.zeros(32); s_hi = np.zeros(32)
                        for L in range(32):
                            g, t = L // 4, L % 4
                            i_lo = row0 + w * 16 + g; j = col0 + nt * 8 + 2 * t + c
                            s_lo[L] = sel_score(scale * f[nt, L, c], i_lo, j, N)
                            s_hi[L] = sel_score(scale * f[nt, L, 2 + c], i_lo + 8, j, N)
                        inc_lo, inc_hi = s_lo.copy(), s_hi.copy()
                        off = 1
                        while off < 8:
                            y_lo = shfl_up(inc_lo, 4 * off); y_hi = shfl_up(inc_hi, 4 * off)
                            for L in range(32):
                                if L // 4 >= off:
                                    inc_lo[L] += y_lo[L]; inc_hi[L] += y_hi[L]
                            off <<= 1
                        tot_lo = np.array([inc_lo[28 + L % 4] for L in range(32)])
                        tot_hi = np.array([inc_hi[28 + L % 4] for L in range(32)])
                        exc_lo = shfl_up(inc_lo, 4); exc_hi = shfl_up(inc_hi, 4)
                        for L in range(32):
                            if L // 4 == 0:
                                exc_lo[L] = 0; exc_hi[L] = 0
                        for L in range(32):
                            f[nt, L, c] = exc_lo[L]; f[nt, L, 2 + c] = tot_lo[L] + exc_hi[L]
                            if L // 4 == 0:
                                warp_tot[w, nt * 8 + 2 * (L % 4) + c] = tot_lo[L] + tot_hi[L]
                fs.append(f)
            for w in range(WARPS):
                f = fs[w]
                for nt in range(8):
                    for c in range(2):
                        for L in range(32):
                            t = L % 4
                            col = nt * 8 + 2 * t + c; j = col0 + col
                            base = poff[row0 // 32, j] if j < N else 0.0
                            base += warp_tot[:w, col].sum()
                            f[nt, L, c] += base; f[nt, L, 2 + c] += base
                if mem_tau is not None:
                    for nt in range(8):
                        for c in range(4):
                            for L in range(32):
                                i = row0 + w * 16 + L // 4 + (8 if c >= 2 else 0)
                                j = col0 + nt * 8 + 2 * (L % 4) + (c % 2)
                                if i < N and j <= i:
                                    mem_part[w, L, c // 2] += min(f[nt, L, c], mem_tau)
                s = gemm_xyt(s_q, s_k, w, D)
                for L in range(32):
                    g, t = L // 4, L % 4
                    i_lo = row0 + w * 16 + g
                    for rh in range(2):
                        i = i_lo + 8 * rh
                        vals = []
                        for nt in range(8):
                            for cc in range(2):
                                c = 2 * rh + cc
                                j = col0 + nt * 8 + 2 * t + cc
                                s[nt, L, c] = scale * s[nt, L, c] - f[nt, L, c] if (i < N and j <= i) else -np.inf
                # row max across the 4 lanes of a group
                for rh in range(2):
                    tm = np.array([max(s[nt, L, 2 * rh + cc] for nt in range(8) for cc in range(2)) for L in range(32)])
                    tm = np.array([max(tm[(L // 4) * 4 + x] for x in range(4)) for L in range(32)])
                    m_new = np.maximum(m[w, :, rh], tm)
                    alpha = np.where(m[w, :, rh] == -np.inf, 0.0, np.exp(np.where(m[w, :, rh] == -np.inf, 0, m[w, :, rh] - m_new)))
                    m[w, :, rh] = m_new
                    rs = np.zeros(32)
                    for L in range(32):
                        for nt in range(8):
                            for cc in range(2):
                                c = 2 * rh + cc
                                s[nt, L, c] = 0.0 if s[nt, L, c] == -np.inf else np.exp(s[nt, L, c] - m_new[L])
                                rs[L] += s[nt, L, c]
                    rs = np.array([sum(rs[(L // 4) * 4 + x] for x in range(4)) for L in range(32)])
                    l[w, :, rh] = l[w, :, rh] * alpha + rs
                    o[w, :, :, 2 * rh:2 * rh + 2] *= alpha[None, :, None]
                for kk in range(BN // 16):
                    a = np.zeros((32, 4, 2))
                    a[:, 0] = s[2 * kk][:, 0:2]; a[:, 1] = s[2 * kk][:, 2:4]
                    a[:, 2] = s[2 * kk + 1][:, 0:2]; a[:, 3] = s[2 * kk + 1][:, 2:4]
                    for dn in range(D // 16):
                        bv = ldmatrix_x4(s_v, lambda L: (kk * 16 + (L % 8) + 8 * ((L // 8) % 2), dn * 16 + 8 * (L // 16)), True)
                        mma(o[w, 2 * dn], a, bv[:, 0], bv[:, 1])
                        mma(o[w, 2 * dn + 1], a, bv[:, 2], bv[:, 3])
        for w in range(WARPS):
            for L in range(32):
                g, t = L // 4, L % 4
                for rh in range(2):
                    i = row0 + w * 16 + g + 8 * rh
                    if i >= N:
                        continue
                    for dt in range(D // 8):
                        d = dt * 8 + 2 * t
                        out[i, d] = o[w, dt, L, 2 * rh] / l[w, L, rh]
                        out[i, d + 1] = o[w, dt, L, 2 * rh + 1] / l[w, L, rh]
                    lse[i] = m[w, L, rh] + np.log(l[w, L, rh])
                    # xor-shuffles 1 and 2: the row group's four lanes; lane t == 0 writes
                    if L % 4 == 0:
                        mem[i] = sum(mem_part[w, L + x, rh] for x in range(4))
    T = lambda x: torch.from_numpy(x)[None, None]
    ref_out, ref_lse = reference.attention(T(q), T(k), T(v), scale=scale, q_sel=T(qs)[:, 0], k_sel=T(ks_)[:, 0], return_lse=True)
    e1 = np.abs(out - ref_out[0, 0].numpy()).max(); e2 = np.abs(lse - ref_lse[0, 0].numpy()).max()
    print(f"N={N} D={D}: max|out err| {e1:.3e}, max|lse err| {e2:.3e}")
    assert e1 < 1e-9 and e2 < 1e-9
    if mem_tau is not None:
        f_ref = reference.accumulated_selection(T(qs)[:, 0], T(ks_)[:, 0], scale)
        assert (f_ref > mem_tau).any() and (f_ref.tril() < mem_tau).any(), "clip inactive"
        e3 = np.abs(mem - reference.memory_rowsum(f_ref, mem_tau)[0].numpy()).max()
        print(f"N={N} D={D} mem_tau={mem_tau}: max|mem err| {e3:.3e}")
        assert e3 < 1e-9


if __name__ == "__main__":
    run(70, 32)
    run(130, 16 * 3)
    run(100, 16, mem_tau=1.0)
