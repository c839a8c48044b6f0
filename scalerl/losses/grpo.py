"""GRPO: the PPO clipped surrogate with group-relative advantages (Shao et al. 2024, DeepSeekMath).

A baseline for ScaleRL's comparisons (Khatri et al. 2025, sec. 3.2). Token-level ratio and the
PPO clipped objective, no KL term (ScaleRL uses none):

    rho_it = exp(logprobs_it - old_logprobs_it)
    J_GRPO = E[ 1/G sum_i 1/|y_i| sum_t min(rho_it * A_i, clip(rho_it, 1 - eps, 1 + eps) * A_i) ]

so the loss we MINIMIZE is

    loss = - sum_{i,t} w_it * min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i)

with w from `token_weights` (aggregation.py). Divided by: GRPO's default aggregation="sample"
divides each completion's token sum by its length |y_i| and averages over completions.
GRPO is eps_low = eps_high = eps (0.2); DAPO (dapo.py) reuses `clipped_surrogate_loss` with
asymmetric bounds. Gradient flows through rho (not through old_logprobs); where the clipped term is
the minimum, the token's gradient is zero.

Shapes: logprobs, old_logprobs, mask (B, T); advantages, group_ids (B,). Off-mask positions may
hold anything (NaN included): they are replaced before the ratio is formed.

Metrics (no grad, over mask tokens): clip_fraction (tokens whose gradient the clip removed:
A > 0 and rho > 1 + eps_high, or A < 0 and rho < 1 - eps_low), clip_high_fraction,
clip_low_fraction, ratio_mean, ratio_max, tokens, loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scalerl.losses.aggregation import Aggregation, as_bool_mask, resolve_weights


def clipped_surrogate_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    *,
    aggregation: Aggregation,
    weights: Tensor | None,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with bounds [1 - eps_low, 1 + eps_high] (GRPO and DAPO)."""
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(
            f"clip bounds need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, "
            f"eps_high={eps_high}. Fix: use GRPO's 0.2/0.2 or DAPO's 0.2/0.28."
        )
    w = resolve_weights(logprobs, old_logprobs, advantages, mask, group_ids, aggregation, weights)
    valid = as_bool_mask(mask)  # (B, T)
    ratio = torch.where(valid, logprobs - old_logprobs, 0.0).exp()  # (B, T); 1 off the mask
    adv = advantages.to(ratio.dtype)[:, None]  # (B, 1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -(w * torch.minimum(unclipped, clipped)).sum()

    with torch.no_grad():
        r = ratio.detach()
        tokens = valid.sum()
        n = tokens.clamp(min=1)
        clip_high = ((r > 1.0 + eps_high) & (adv > 0) & valid).sum()
        clip_low = ((r < 1.0 - eps_low) & (adv < 0) & valid).sum()
        metrics = {
            "clip_fraction": float((clip_high + clip_low) / n),
            "clip_high_fraction": float(clip_high / n),
            "clip_low_fraction": float(clip_low / n),
            "ratio_mean": float(torch.where(valid, r, 0.0).sum() / n),
            "ratio_max": float(torch.where(valid, r, 0.0).max()) if r.numel() else 0.0,
            "tokens": float(tokens),
            "loss": loss.item(),
        }
    return loss, metrics


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    *,
    aggregation: Aggregation = "sample",
    weights: Tensor | None = None,
    eps: float = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss (to minimize): symmetric PPO clip [1 - eps, 1 + eps], sample-average by default."""
    return clipped_surrogate_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        group_ids,
        aggregation=aggregation,
        weights=weights,
        eps_low=eps,
        eps_high=eps,
    )
