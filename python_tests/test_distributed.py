"""selattn_ext.distributed with real processes: W CPU processes on gloo per test, each running
python_tests/distributed_cases.py (fp64, compared with the unsharded computation to round-off).

Marked ``distributed``. The CI run (plain ``pytest``) runs one cheap launch (2 processes: the
DTensor strategies, the TP module, context parallelism); the rest (FSDP2, DDP, TP and CP
training of the tiny LM, TP decoding through pruned caches, 4 processes) runs with
``SELATTN_DISTRIBUTED_TESTS=all`` (each launch costs ~20-70 s of process start-up and gloo
set-up on a loaded 2-core machine).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_cases.py")
ALL = os.environ.get("SELATTN_DISTRIBUTED_TESTS", "") == "all"

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
]
full_only = pytest.mark.skipif(not ALL, reason="set SELATTN_DISTRIBUTED_TESTS=all")


def _child_env(**extra: str) -> dict:
    """The environment of a child process: it must import the selattn_ext this test imported
    (an installed wheel, or the source tree pytest put on sys.path), whatever its cwd."""
    import selattn_ext
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(selattn_ext.__file__)))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=pkg_parent + (os.pathsep + path if path else ""), **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, timeout: float = 900) -> None:
    """Runs ``scenario`` on ``world`` gloo processes; fails with every rank's output."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = _child_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, WORKER, scenario], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs, failed = [], False
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            out += f"\n(timed out after {timeout} s)"
            failed = True
        failed |= p.returncode != 0
        outputs.append(f"--- rank {rank} (exit {p.returncode}) ---\n{out[-4000:]}")
    if failed:
        pytest.fail(f"{scenario} on {world} processes failed:\n" + "\n".join(outputs),
                    pytrace=False)


def test_ci_subset_two_processes():
    """DTensor head/batch sharding of the ops (dense + varlen, fwd + bwd incl. the memory
    loss), the TP module (GQA, selection head on either rank, memory_tau), CP fwd + bwd."""
    launch("dtensor_ops,tp,cp", 2)


@full_only
@pytest.mark.parametrize("scenario", ["ddp", "fsdp", "tp_lm", "cp_lm", "tp_decode"])
def test_two_processes(scenario):
    launch(scenario, 2)


@full_only
def test_four_processes():
    launch("tp,cp,tp_decode,dtensor_ops", 4)


@full_only
@pytest.mark.parametrize("mode", ["fsdp", "ddp", "tp", "cp"])
def test_example_under_torchrun(mode, tmp_path):
    """examples/train_tiny_lm.py --parallel MODE, as torchrun runs it (2 processes, 3 steps)."""
    example = os.path.join(os.path.dirname(HERE), "examples", "train_tiny_lm.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), example, "--parallel", mode, "--steps", "3",
           "--batch", "4", "--context", "32", "--dim", "32", "--layers", "1"]
    env = _child_env(OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"{mode} on 2 processes" in res.stdout, res.stdout[-3000:]


# --- in-process checks (no process group needed) ---------------------------------------------

def test_import_selattn_ext_does_not_import_distributed():
    code = ("import sys, selattn_ext; "
            "assert 'selattn_ext.distributed' not in sys.modules; "
            "assert 'torch.distributed.tensor.parallel' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=_child_env())


def test_qkv_row_order_regroups_each_ranks_heads():
    from selattn_ext.distributed import qkv_row_order

    # 4 q heads, 2 kv heads, head_dim 1, 2 ranks: rows q0..q3, k0 k1, v0 v1.
    assert qkv_row_order(4, 2, 1, 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    with pytest.raises(ValueError, match="num_kv_heads"):
        qkv_row_order(4, 2, 8, 4)


def test_clear_errors_without_a_process_group():
    import torch

    import selattn_ext.distributed as sd
    from selattn_ext.nn import SelectiveSelfAttention

    with pytest.raises(ValueError, match="no SelectiveSelfAttention"):
        sd.tp_plan(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not tensor-parallel"):
        sd.tp_kv_cache(SelectiveSelfAttention(16, 2), 1, 4)
    if not dist.is_initialized():
        q = torch.randn(1, 2, 4, 8)
        with pytest.raises(RuntimeError, match="init_process_group"):
            sd.context_parallel_attention(q, q, q)
