"""The optimiser, its schedule, and the whole run's data order (deterministic in the seed)."""

from __future__ import annotations

import math
import random

import torch


class KahanAdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights: bf16 moments and a bf16 Kahan compensation, 10 bytes a parameter with the
    weight and its gradient (float32 master weights and float32 AdamW: 16).

    Per parameter p (bf16) with gradient g, first/second moments m, v and compensation c (bf16 state), at
    step t, computed in float32:

        w  = (p + c) * (1 - lr * weight_decay)          # decoupled weight decay, as torch.optim.AdamW
        m  = b1 * m + (1 - b1) * g                      # stored back as bf16
        v  = b2 * v + (1 - b2) * g^2                    # stored back as bf16
        w -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
        p  = bf16(w);  c = bf16(w - p)

    Why: an update of lr 1e-5 on a weight of ~1e-2 is below half a bf16 ulp (~3e-5 there), so `p -= update`
    in bf16 rounds it away, every step. c keeps what the rounding dropped and adds it back at the next step,
    so the updates accumulate until they move p: p + c follows float32 master weights to within bf16's
    rounding of c (tests/test_optim_kahan.py). The moments need no compensation: with the recipe's
    b2 = 0.95 a step moves v by 5% of (g^2 - v), well above bf16's relative precision (2^-9) for gradients
    that vary; with b2 = 0.999 (0.1%) a steady v's increments would be rounded away like the weights'.
    A float32 parameter (accelerate's FSDP2 upcasts them under mixed precision) rounds exactly: c stays 0.

    The float32 work runs over the flattened tensor in chunks of at most `chunk_size` elements, so its
    temporaries stay a few x 64 MiB whatever the tensor (a 128k x 2048 embedding is 1 GiB in float32).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, chunk_size: int = 2**24):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.chunk_size = chunk_size

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            hps = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]  # in self.state: the base class saves and loads it (state_dict)
                if not state:
                    state["step"] = 0
                    for name in ("exp_avg", "exp_avg_sq", "compensation"):
                        state[name] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
                state["step"] += 1
                t = state["step"]
                if (t, p.device) not in hps:  # the step's scalars, once per step and device
                    hps[t, p.device] = torch.tensor([1 - lr * wd, b1, b2, eps, lr / (1 - b1**t), math.sqrt(1 - b2**t)],
                                                    dtype=torch.float32).to(p.device)
                hp = hps[t, p.device]
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["compensation"])
                if p.is_cuda:  # one fused kernel a tensor: no float32 temporaries, nothing to chunk
                    _compiled_update()(*tensors, hp)
                    continue
                if p.is_contiguous() and p.grad.is_contiguous():  # views of the flat tensors: written in place
                    pieces = zip(*(x.view(-1).split(self.chunk_size) for x in tensors))
                else:
                    pieces = [tensors]
                for piece in pieces:
                    kahan_update_(*piece, hp)
        return loss


def kahan_update_(w_lo, g, m_lo, v_lo, c_lo, hp) -> None:
    """One KahanAdamW update of a weight (or a chunk of one), in place; hp: [6] float32 = (1 - lr * wd, b1, b2,
    eps, lr / (1 - b1^t), sqrt(1 - b2^t)), a tensor so that a compiled version never recompiles for new values."""
    decay, b1, b2, eps, step_size, bc2_sqrt = hp.unbind()
    g = g.float()
    m = m_lo.float() * b1 + (1 - b1) * g
    v = v_lo.float() * b2 + (1 - b2) * g * g
    w = (w_lo.float() + c_lo.float()) * decay  # the weight with what rounding dropped, decayed
    w = w - step_size * m / (v.sqrt() / bc2_sqrt + eps)
    rounded = w.to(w_lo.dtype)  # round to nearest in the weight's dtype
    m_lo.copy_(m)
    v_lo.copy_(v)
    c_lo.copy_(w - rounded.float())  # what that rounding dropped: added back next step
    w_lo.copy_(rounded)


_COMPILED = []


def _compiled_update():
    """kahan_update_ compiled (CUDA): one kernel reads weight, gradient and state and writes them back, where
    the eager version runs ~15 kernels with float32 temporaries (measured on an H200, 1B shape: the eager
    optimizer step cost 30 ms of a 0.2 s DPO step). dynamic: one graph for every tensor size.
    emulate_precision_casts: without it inductor folds `w.to(bf16).float()` into `w`, the rounding error it
    measures is then 0 and the compensation silently does nothing (tests/test_optim_kahan.py catches it)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(kahan_update_, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True}))
    return _COMPILED[0]


def make_optimizer(model, cfg, total_steps: int):
    """AdamW on trainable parameters with linear warmup then cosine decay to 10% of the peak lr.
    `master_weights: bf16_kahan`: KahanAdamW (bf16 weights, moments and compensation); else torch's AdamW
    (on the float32 master weights that core.models.fp32_master_weights made)."""
    params = [p for p in model.parameters() if p.requires_grad]
    adamw = KahanAdamW if getattr(cfg, "master_weights", "float32") == "bf16_kahan" else torch.optim.AdamW
    opt = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
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

