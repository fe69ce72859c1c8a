"""Train a tiny byte-level selective-attention LM on the standard library's sources (CPU, minutes).

    python examples/train_tiny_lm.py --steps 300             # selective attention
    python examples/train_tiny_lm.py --steps 300 --baseline  # plain causal attention, same size
    python examples/train_tiny_lm.py --steps 300 --memloss-eps 0.1  # + the paper's memory loss
    torchrun --nproc-per-node 2 examples/train_tiny_lm.py --parallel fsdp  # or ddp, tp, cp
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_lm import TinyLM, TinyLMConfig, lm_loss, load_stdlib_bytes, windows  # noqa: E402

import selattn_ext  # noqa: E402


@torch.no_grad()
def evaluate(model: TinyLM, data: torch.Tensor, context: int, batches: int, batch: int) -> float:
    """Mean loss over evenly spaced, fixed validation windows."""
    model.eval()
    n = batches * batch
    starts = torch.linspace(0, len(data) - context - 1, n).long()
    losses = [lm_loss(model, *windows(data, context, starts[i:i + batch])).item()
              for i in range(0, n, batch)]
    model.train()
    return sum(losses) / len(losses)


def memory_term(model: TinyLM) -> torch.Tensor:
    """The paper's L_mem for the last forward: mean over layers (and batch) of max_i M / N,
    M with the layers' ``memory_tau`` (a fraction of the context, so eps does not depend on N)."""
    mems = [blk.attn.last_memory for blk in model.blocks]
    if any(m is None for m in mems):
        raise ValueError("the memory loss needs TinyLMConfig(memory_tau=...) (selective layers)")
    return selattn_ext.memory_loss(mems) / mems[0].shape[-1]


def train(cfg: TinyLMConfig, steps: int, batch: int, lr: float, seed: int, train_data: torch.Tensor,
          progress: bool = True, log_every: int = 50, memloss_eps: float = 0.0) -> TinyLM:
    """AdamW with warm-up and cosine decay; the data order depends only on ``seed``.

    ``memloss_eps > 0`` adds the paper's auxiliary memory loss, ``eps * mean over layers of
    max_i M / N`` (needs ``cfg.memory_tau``, the paper's tau = 1), to the LM loss."""
    if memloss_eps and cfg.memory_tau is None:
        raise ValueError("memloss_eps needs cfg.memory_tau (e.g. 1.0) so the layers compute M")
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    bar = range(steps)
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(bar, desc="selective" if cfg.selective else "baseline", leave=False)
        except ImportError:
            pass
    for step in bar:
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        starts = torch.randint(0, len(train_data) - cfg.context - 1, (batch,), generator=gen)
        loss = lm_loss(model, *windows(train_data, cfg.context, starts))
        if memloss_eps:
            loss = loss + memloss_eps * memory_term(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress and hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        elif not hasattr(bar, "set_postfix") and step % log_every == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", action="store_true", help="plain causal attention instead")
    p.add_argument("--save", default=None, help="path to save the state dict")
    p.add_argument("--parallel", choices=("fsdp", "ddp", "tp", "cp"), default=None,
                   help="under torchrun: data (fsdp, ddp), tensor (tp) or context (cp) "
                        "parallelism (examples/distributed_lm.py)")
    p.add_argument("--memloss-eps", type=float, default=0.0,
                   help="weight of the paper's memory loss (mean over layers of max_i M / N, tau = 1); "
                        "0 disables it")
    args = p.parse_args()
    if args.parallel:
        if args.memloss_eps:
            p.error("--memloss-eps is not wired into --parallel yet; train on one process")
        return main_parallel(args)
    train_data, val_data, counts = load_stdlib_bytes()
    print(f"data: {counts}")
    if args.memloss_eps and args.baseline:
        p.error("--memloss-eps needs selective attention (drop --baseline)")
    cfg = TinyLMConfig(dim=args.dim, layers=args.layers, heads=args.heads,
                       selective=not args.baseline, context=args.context,
                       memory_tau=1.0 if args.memloss_eps else None)
    t0 = time.time()
    model = train(cfg, args.steps, args.batch, args.lr, args.seed, train_data,
                  memloss_eps=args.memloss_eps)
    print(f"trained {model.num_params()} params for {args.steps} steps in {time.time() - t0:.0f} s")
    print(f"validation loss: {evaluate(model, val_data, args.context, 8, args.batch):.4f} nats/byte")
    if args.save:
        torch.save({"config": cfg.__dict__, "state_dict": model.state_dict()}, args.save)


def main_parallel(args) -> None:
    """--parallel: the same training on torch.distributed (gloo on CPUs, NCCL on GPUs)."""
    import torch.distributed as dist

    from distributed_lm import init_distributed, train_parallel

    rank, world, device = init_distributed()
    train_data, _, _ = load_stdlib_bytes()
    cfg = TinyLMConfig(dim=args.dim, layers=args.layers, heads=args.heads,
                       selective=not args.baseline, context=args.context)
    try:
        _, losses, sec = train_parallel(cfg, args.parallel, args.steps, args.batch, args.lr,
                                        args.seed, train_data)
        if rank == 0:
            print(f"{args.parallel} on {world} processes ({device.type}): {args.steps} steps, "
                  f"final loss {losses[-1]:.4f}, {args.batch * args.context / sec:.0f} tokens/s")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
