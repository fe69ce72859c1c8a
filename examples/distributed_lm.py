"""Data, tensor and context parallelism for the tiny LM (used by ``train_tiny_lm.py
--parallel`` under torchrun, and by ``bench/distributed.py``).

    torchrun --nproc-per-node 2 examples/train_tiny_lm.py --parallel fsdp|ddp|tp|cp

The same code runs on CPU processes (gloo) and on GPUs (NCCL, one per process): the backend
and device follow ``torch.cuda.is_available()``.

* fsdp: FSDP2 ``fully_shard`` per block and for the model; each rank trains on its own
  ``batch / world`` windows. ddp: the same with DistributedDataParallel.
* tp: ``parallelize_module(model, mesh, tp_plan(model) | mlp_plan)``: attention heads and MLP
  columns sharded; every rank sees the same batch.
* cp: ``enable_context_parallel(model)``: every rank holds ``context / world`` consecutive
  positions of every window; gradients are averaged over ranks after backward.
"""

from __future__ import annotations

import math
import os
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("fsdp", "ddp", "tp", "cp")


def init_distributed() -> Tuple[int, int, torch.device]:
    """init_process_group from torchrun's environment: (rank, world, device)."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def parallelize(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """Applies ``mode`` to a TinyLM (already on ``device``); returns the model to train."""
    from torch.distributed.device_mesh import init_device_mesh

    import selattn_ext.distributed as sd

    world = dist.get_world_size()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (world,))
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if mode == "tp":
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)

        plan = sd.tp_plan(model)  # the attention layers
        for i in range(len(model.blocks)):  # the MLPs, Megatron-style
            plan[f"blocks.{i}.mlp.0"] = ColwiseParallel()
            plan[f"blocks.{i}.mlp.2"] = RowwiseParallel()
        return parallelize_module(model, mesh, plan)
    if mode == "cp":
        return sd.enable_context_parallel(model)
    raise ValueError(f"unknown parallel mode {mode!r}; one of {MODES}")


def local_batch(inputs: Tensor, targets: Tensor, mode: str) -> Tuple[Tensor, Tensor]:
    """This rank's share of a global batch (the same on every rank): rows for fsdp/ddp,
    positions for cp, everything for tp."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode in ("fsdp", "ddp"):
        if inputs.shape[0] % world:
            raise ValueError(f"--batch ({inputs.shape[0]}) must be divisible by {world} ranks")
        per = inputs.shape[0] // world
        return inputs[rank * per:(rank + 1) * per], targets[rank * per:(rank + 1) * per]
    if mode == "cp":
        if inputs.shape[1] % world:
            raise ValueError(f"--context ({inputs.shape[1]}) must be divisible by {world} ranks")
        n = inputs.shape[1] // world
        return inputs[:, rank * n:(rank + 1) * n], targets[:, rank * n:(rank + 1) * n]
    return inputs, targets


def loss_fn(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def global_mean(x: Tensor, mode: str) -> float:
    """The global batch's mean loss from each rank's local mean (equal shares)."""
    t = x.detach().double().reshape(1).clone()
    if mode != "tp":  # tp ranks already hold the global value
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


def finish_grads(model: nn.Module, mode: str) -> None:
    """cp keeps parameters replicated and plain: average their gradients (one flat all-reduce).
    fsdp/ddp/tp synchronise inside backward."""
    if mode != "cp":
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global-norm clipping over plain and DTensor gradients (sharded ones summed over ranks)."""
    from torch.distributed.tensor import DTensor

    total = None
    for p in model.parameters():
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            sq = g.to_local().double().pow(2).sum()
            if any(pl.is_shard() for pl in g.placements):
                dist.all_reduce(sq)
        else:
            sq = g.double().pow(2).sum()
        total = sq if total is None else total + sq
    norm = math.sqrt(total.item()) if total is not None else 0.0
    if norm > max_norm:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def train_parallel(cfg, mode: str, steps: int, batch: int, lr: float, seed: int,
                   train_data: Tensor, log_every: int = 50, dtype: torch.dtype = torch.float32):
    """train_tiny_lm.train's loop, parallelised: every rank builds the same model (seed) and
    draws the same global batches; ``local_batch`` picks its share. Returns (model, losses,
    seconds per step) on every rank; rank 0 prints."""
    import time

    from tiny_lm import TinyLM, windows

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    torch.manual_seed(seed)
    model = parallelize(TinyLM(cfg).to(device=device, dtype=dtype), mode, device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        starts = torch.randint(0, len(train_data) - cfg.context - 1, (batch,), generator=gen)
        inputs, targets = (t.to(device) for t in windows(train_data, cfg.context, starts))
        loss = loss_fn(model, *local_batch(inputs, targets, mode))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        finish_grads(model, mode)
        clip_grad_norm(model, 1.0)
        opt.step()
        losses.append(global_mean(loss, mode))
        if rank == 0 and step % log_every == 0:
            print(f"step {step} loss {losses[-1]:.4f}", flush=True)
    return model, losses, (time.perf_counter() - t0) / max(1, steps)
