"""CPU emulation of the SIMT backward (csrc/cuda/prefill_simt_bwd.cuh) at tile granularity.

Same loop order (query blocks walked from last to first per key block), same Poff and in-tile
cumsum for F, same running suffix sum of dL for the F path, same masks, and with mem_tau the
memory-loss term (-dmem where F < mem_tau, head 0 only) folded into that suffix sum; compared
with autograd through selattn_ext.reference in fp64. Run: python tools/cuda_emulation/prefill/simt_bwd_tiles.py
Keep it in step with the kernel when the kernel changes.
"""
import os
import sys
import numpy as np
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from selattn_ext import reference

T = 32


def run(N, D, Hq, Hkv, seed=0, with_dlse=True, mem_tau=None):
    g = torch.Generator().manual_seed(seed)
    q = 1.5 * torch.randn(Hq, N, D, dtype=torch.float64, generator=g)
    k = 1.5 * torch.randn(Hkv, N, D, dtype=torch.float64, generator=g)
    v = 1.5 * torch.randn(Hkv, N, D, dtype=torch.float64, generator=g)
    qs = 1.5 * torch.randn(N, D, dtype=torch.float64, generator=g)
    ks = 1.5 * torch.randn(N, D, dtype=torch.float64, generator=g)
    dout = torch.randn(Hq, N, D, dtype=torch.float64, generator=g)
    dlse = torch.randn(Hq, N, dtype=torch.float64, generator=g) if with_dlse else torch.zeros(Hq, N, dtype=torch.float64)
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

    nqb = (N + T - 1) // T
    pad = lambda x, r0: np.vstack([x, np.zeros((nqb * T + T, x.shape[1]))])[r0:r0 + T]
    # pre-pass
    A = scale * qs @ ks.T
    ii, jj = np.arange(N)[:, None], np.arange(N)[None, :]
    S = np.where((jj >= 1) & (jj < ii) & (A > 0), A, 0.0)
    poff = np.zeros((nqb, N))
    for qb in range(1, nqb):
        poff[qb] = poff[qb - 1] + S[(qb - 1) * T:qb * T].sum(0)
    Dl = (dout * out).sum(-1) - dlse
    dq = np.zeros_like(q); dk = np.zeros_like(k); dv = np.zeros_like(v)
    dqs = np.zeros_like(qs); dks = np.zeros_like(ks)
    grp = Hq // Hkv
    for h in range(Hq):
        hk = h // grp
        for kb in range(nqb):
            col0 = kb * T
            dl_suffix = np.zeros(T)
            dv_acc = np.zeros((T, D)); dk_acc = np.zeros((T, D)); dks_acc = np.zeros((T, D))
            for qb in range(nqb - 1, kb - 1, -1):
                row0 = qb * T
                i = row0 + np.arange(T)[:, None]; j = col0 + np.arange(T)[None, :]
                a = pad(qs, row0) @ pad(ks, col0).T
                s_tile = np.where((i < N) & (j >= 1) & (j < i) & (scale * a > 0), scale * a, 0.0)
                run_ = np.array([poff[qb, c] if c < N else 0.0 for c in range(col0, col0 + T)])
                f = np.zeros((T, T))
                for r in range(T):
                    f[r] = run_; run_ = run_ + s_tile[r]
                # below_tau (warp 0's bit mask): head 0 only, j <= i < N, F < mem_tau.
                add_mem = h == 0 and mem_tau is not None
                below_tau = add_mem & (i < N) & (j <= i) & (f < (mem_tau or 0.0))
                dmem_r = np.array([dmem[x] if x < N else 0.0 for x in range(row0, row0 + T)])
                s = pad(q[h], row0) @ pad(k[hk], col0).T
                dp = pad(dout[h], row0) @ pad(v[hk], col0).T
                valid = (i < N) & (j <= i)
                lse_r = np.array([lse[h, x] if x < N else 0.0 for x in range(row0, row0 + T)])[:, None]
                dl_r = np.array([Dl[h, x] if x < N else 0.0 for x in range(row0, row0 + T)])[:, None]
                with np.errstate(over="ignore"):
                    p_tile = np.where(valid, np.exp(np.where(valid, scale * s - f - lse_r, 0)), 0.0)
                dl_tile = np.where(valid, p_tile * (dp - dl_r), 0.0)
                run_ = dl_suffix.copy()
                for r in range(T - 1, -1, -1):
                    s_tile[r] = np.where(s_tile[r] > 0, -run_, 0.0)
                    run_ = run_ + dl_tile[r]
                    run_ = run_ - np.where(below_tau[r], dmem_r[r], 0.0)
                dl_suffix = run_
                dv_acc += p_tile.T @ pad(dout[h], row0)
                dk_acc += dl_tile.T @ pad(q[h], row0)
                dks_acc += s_tile.T @ pad(qs, row0)
                rows = slice(row0, min(row0 + T, N)); nr = rows.stop - rows.start
                dq[h, rows] += scale * (dl_tile @ pad(k[hk], col0))[:nr]
                dqs[rows] += scale * (s_tile @ pad(ks, col0))[:nr]
            cols = slice(col0, min(col0 + T, N)); nc = cols.stop - cols.start
            dv[hk, cols] += dv_acc[:nc]; dk[hk, cols] += scale * dk_acc[:nc]; dks[cols] += scale * dks_acc[:nc]
    for name, got, leaf in zip(("dq", "dk", "dv", "dq_sel", "dk_sel"), (dq, dk, dv, dqs, dks), leaves):
        err = np.abs(got - leaf.grad.numpy()).max()
        print(f"N={N} D={D} Hq={Hq} Hkv={Hkv} mem_tau={mem_tau} {name}: max|err| {err:.2e} (max {np.abs(leaf.grad.numpy()).max():.2e})")
        assert err < 1e-9


run(37, 8, 2, 1)
run(70, 5, 3, 3, with_dlse=False)
run(96, 4, 2, 2)
run(70, 8, 3, 1, mem_tau=1.0)
run(45, 6, 2, 2, with_dlse=False, mem_tau=0.4)
