"""A CUDA decode step is capturable in a CUDA graph (issue 13, item 2): two kernel launches on
the current stream, the workspace reused from the cache, no allocation of its own, no host
synchronisation and no device query. Capture fails loudly on any of those (a .item() or a
cudaDeviceSynchronize inside capture is an error), and replaying the graph must give what eager
steps give, and what the fp64 reference gives.

GPU only (``cuda`` marker, run by bench/gpu_check.sh); skipped without a CUDA device.
"""

import pytest
import torch

import selattn_ext
from selattn_ext import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cache(dtype, num_q_heads=None, **kw):
    return selattn_ext.SelectiveKVCache(2, 2, 64, 12, max_chunk=1, dtype=dtype, device="cuda",
                                        num_q_heads=num_q_heads, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_decode_step_replays_from_a_cuda_graph(dtype, ragged):
    B, Hq, Hkv, D, steps = 2, 8, 2, 64, 40  # budget 12: evicts from step 13 on
    g = torch.Generator().manual_seed(0)
    qs = (torch.randn(steps, B, Hq, 1, D, generator=g) * 1.5).to(dtype).cuda()
    ks = (torch.randn(steps, B, Hkv, 1, D, generator=g) * 1.5).to(dtype).cuda()
    vs = torch.randn(steps, B, Hkv, 1, D, generator=g).to(dtype).cuda()
    lens = torch.randint(0, 2, (steps, B), generator=g) if ragged else None
    lens_cuda = lens.cuda() if ragged else None

    graphed, eager = _cache(dtype, num_q_heads=Hq), _cache(dtype)
    ws_ptr, ws_bytes = graphed.workspace.data_ptr(), graphed.memory_bytes()
    assert graphed.workspace_bytes() > 0
    static_q, static_k, static_v = qs[0].clone(), ks[0].clone(), vs[0].clone()
    static_len = lens_cuda[0].clone() if ragged else None

    # Warm up on a side stream (as torch.cuda.graphs asks), on a throwaway copy of the state.
    warm = _cache(dtype, num_q_heads=Hq)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        selattn_ext.decode(static_q, static_k, static_v, warm, lengths=static_len)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    # Capturing records the step without running it: the cache state stays untouched.
    with torch.cuda.graph(graph):
        static_out = selattn_ext.decode(static_q, static_k, static_v, graphed, lengths=static_len)
    assert int(graphed.seq_len.sum()) == 0

    oracle = reference.ReferenceKVCache(12, sel_head=0)
    for s in range(steps):
        static_q.copy_(qs[s]), static_k.copy_(ks[s]), static_v.copy_(vs[s])
        if ragged:
            static_len.copy_(lens_cuda[s])
        graph.replay()
        want = selattn_ext.decode(qs[s], ks[s], vs[s], eager,
                                  lengths=lens_cuda[s] if ragged else None)
        torch.testing.assert_close(static_out, want, rtol=0, atol=0)  # same kernels, same order
        ref = oracle.step(qs[s].double().cpu(), ks[s].double().cpu(), vs[s].double().cpu(),
                          lengths=lens[s].tolist() if ragged else None)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        assert (static_out.double().cpu() - ref).abs().max() < tol, s
    assert graphed.positions() == eager.positions() == oracle.positions()
    assert graphed.seq_lengths == eager.seq_lengths
    torch.testing.assert_close(graphed.f, eager.f, rtol=0, atol=0)
    # The workspace is the cache's, reused: nothing reallocated, memory as accounted.
    assert graphed.workspace.data_ptr() == ws_ptr and graphed.memory_bytes() == ws_bytes


def test_cuda_workspace_is_counted_and_reused():
    cache = _cache(torch.float16)
    assert cache.workspace is None and cache.memory_bytes() == cache.state_bytes()
    q = torch.randn(2, 4, 1, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 2, 1, 64, device="cuda", dtype=torch.float16)
    selattn_ext.decode(q, k, k, cache)
    ws = cache.workspace
    assert ws is not None and cache.workspace_bytes() == ws.numel() > 0
    assert cache.memory_bytes() == cache.state_bytes() + ws.numel()
    selattn_ext.decode(q, k, k, cache)
    assert cache.workspace is ws  # reused, not reallocated
    bytes_needed = torch.ops.selattn.decode_cuda_workspace_bytes(2, 4, 2, 1, 64, cache.slots,
                                                                 torch.float16, cache.device)
    assert ws.numel() == bytes_needed
