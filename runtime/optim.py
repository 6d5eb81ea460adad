"""The optimizer, its learning-rate schedule and float16's dynamic loss scale.

AdamW is torch's fused implementation (one kernel over all parameters, on a CPU as on a
GPU). It reads ``optimizer.found_inf`` (a 0-dim tensor, 1.0 = skip) inside the kernel:
a step whose gradient is not finite leaves the weights, both moments and the step count
untouched without the host looking at the gradient first, so the same step skips in eager
mode and inside a captured CUDA graph (as torch.amp.GradScaler does for fused optimizers).
"""
from __future__ import annotations

import math

import torch


def lr_at(step: int, o) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr · lr at the last step."""
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    span = max(o.steps - o.warmup, 1)
    cos = 0.5 * (1 + math.cos(math.pi * min(step - o.warmup, span) / span))
    return o.lr * (o.min_lr + (1 - o.min_lr) * cos)


def make_optimizer(model, o, lr: torch.Tensor, capturable: bool) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with β = (0.9, 0.95); weight decay on matrices except the
    embedding. ``lr`` is a tensor the caller fills each step (no re-capture when it changes)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True, capturable=capturable)


class LossScale:
    """Dynamic loss scaling for float16 (Micikevicius et al. 2018, "Mixed Precision Training", §3.2):
    the loss is multiplied by S before backward so small gradients do not flush to zero in
    float16; the gradients are divided by S before clipping. A step whose gradient overflowed
    is skipped and halves S; ``growth_interval`` clean steps in a row double it. The defaults
    are torch.amp.GradScaler's. Tensor state only, updated without host syncs (capturable)."""

    def __init__(self, device, init: float = 2.0**16, growth: float = 2.0, backoff: float = 0.5,
                 growth_interval: int = 2000):
        self.scale = torch.full((), init, dtype=torch.float32, device=device)
        self.clean_steps = torch.zeros((), dtype=torch.int64, device=device)  # since the last overflow or growth
        self.growth, self.backoff, self.growth_interval = growth, backoff, growth_interval

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor) -> None:
        bad = found_inf > 0
        grow = ~bad & (self.clean_steps + 1 >= self.growth_interval)
        self.scale.copy_(torch.where(bad, self.scale * self.backoff, torch.where(grow, self.scale * self.growth,
                                                                                  self.scale)))
        self.clean_steps.copy_(torch.where(bad | grow, torch.zeros_like(self.clean_steps), self.clean_steps + 1))

    def state(self) -> dict:
        return {"loss_scale": self.scale, "loss_scale_clean_steps": self.clean_steps}


def prime_optimizer(optimizer) -> None:
    """Make AdamW's lazily created state now (step 0, zero moments): a checkpoint load then has
    tensors to fill, and a snapshot taken before the first step covers every tensor."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device) \
                    if group.get("capturable") or group.get("fused") else torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
