"""The optimiser, its schedule, and the whole run's data order (deterministic in the seed)."""

from __future__ import annotations

import math
import random

import torch


def make_optimizer(model, cfg, total_steps: int):
    """AdamW on trainable parameters with linear warmup then cosine decay to 10% of the peak lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, int(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def plan_steps(n_examples: int, cfg, world_size: int, seed: int) -> list[list[list[int]]]:
    """The whole run's data order: per optimizer step, per micro-batch, the example indices of this run.

    Deterministic in `seed`, so a resumed run sees exactly the batches it would have seen. Each
    process takes its own slice of every step's examples (data parallel)."""
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    if cfg.max_steps > 0:
        total = cfg.max_steps
    else:
        total = max(1, math.ceil(cfg.epochs * n_examples / per_step))
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < total * per_step:
        perm = list(range(n_examples))
        rng.shuffle(perm)
        order += perm
    steps = []
    for s in range(total):
        chunk = order[s * per_step : (s + 1) * per_step]
        steps.append([chunk[m * cfg.batch_size * world_size : (m + 1) * cfg.batch_size * world_size] for m in range(cfg.grad_accum)])
    return steps

