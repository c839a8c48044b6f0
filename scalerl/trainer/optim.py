"""AdamW with the paper's defaults and a constant-after-linear-warmup learning rate.

ScaleRL (Khatri et al. 2025, sec. 7 of ../shared/SCALERL.md): AdamW, lr 5e-7 constant after a
100-step linear warmup, eps 1e-15, weight decay 0.01; gradients clipped by global norm.

    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer.warmup_steps)
    ...; optimizer.step(); scheduler.step()

Schedule: the s-th optimizer step (s = 0, 1, ...) uses

    lr_s = lr * min(1, (s + 1) / warmup_steps)        (lr_s = lr when warmup_steps = 0)

so the first step already moves the weights (a zero-lr first step would publish a policy
identical to version 0). Departure: the paper does not say whether weight decay skips biases
and norms; like torch's AdamW default, it applies to every parameter here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from scalerl.config import OptimizerConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig
) -> torch.optim.AdamW:
    """AdamW over `params` with lr, betas, eps and weight decay from `cfg`."""
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The multiplier of the base lr at optimizer step `step` (0-based)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


class _Warmup:
    # A picklable callable: LambdaLR keeps plain objects (not lambdas) in its state_dict.
    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return warmup_factor(step, self.warmup_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> LambdaLR:
    """Linear warmup over `warmup_steps` optimizer steps, then constant."""
    return LambdaLR(optimizer, _Warmup(warmup_steps))


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the next optimizer.step() will use."""
    return float(optimizer.param_groups[0]["lr"])
