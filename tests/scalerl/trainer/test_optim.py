"""AdamW defaults and the constant-after-linear-warmup schedule (optim.py)."""

from __future__ import annotations

import pytest
import torch

from scalerl.config import OptimizerConfig, RunConfig
from scalerl.trainer.optim import build_optimizer, build_scheduler, current_lr


def test_paper_defaults_reach_adamw():
    cfg = RunConfig().optimizer
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    group = opt.param_groups[0]
    assert (group["lr"], group["eps"], group["weight_decay"]) == (5e-7, 1e-15, 0.01)
    assert group["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_lr_is_linear_over_warmup_then_constant(warmup):
    p = torch.nn.Parameter(torch.ones(1))
    opt = build_optimizer([p], OptimizerConfig(lr=0.1, warmup_steps=warmup))
    sched = build_scheduler(opt, warmup)
    seen = []
    for _ in range(8):
        seen.append(current_lr(opt))
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
    expected = [0.1 * (min(1.0, (s + 1) / warmup) if warmup else 1.0) for s in range(8)]
    assert seen == pytest.approx(expected)


def test_first_adamw_step_matches_the_formula():
    # Step 1 with bias correction: m_hat = g, v_hat = g^2, so
    # p1 = p0 * (1 - lr * wd) - lr * g / (|g| + eps).
    p0 = torch.tensor([1.0, -2.0, 3.0])
    g = torch.tensor([0.5, -0.25, 2.0])
    p = torch.nn.Parameter(p0.clone())
    opt = build_optimizer([p], OptimizerConfig(lr=0.01, warmup_steps=0))
    p.grad = g.clone()
    opt.step()
    expected = p0 * (1 - 0.01 * 0.01) - 0.01 * g / (g.abs() + 1e-15)
    torch.testing.assert_close(p.detach(), expected)


def test_scheduler_state_round_trips_through_weights_only_load(tmp_path):
    p = torch.nn.Parameter(torch.ones(1))
    opt = build_optimizer([p], OptimizerConfig(lr=0.1, warmup_steps=5))
    sched = build_scheduler(opt, 5)
    for _ in range(3):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    opt2 = build_optimizer(
        [torch.nn.Parameter(torch.ones(1))], OptimizerConfig(lr=0.1, warmup_steps=5)
    )
    sched2 = build_scheduler(opt2, 5)
    sched2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert sched2.last_epoch == 3 and current_lr(opt2) == pytest.approx(0.1 * 4 / 5)
