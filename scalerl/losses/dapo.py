"""DAPO: PPO clipped surrogate with clip-higher and token-level aggregation (Yu et al. 2025).

A baseline for ScaleRL's comparisons (Khatri et al. 2025, sec. 3.2). DAPO decouples the clip
bounds so that low-probability tokens can grow further ("clip-higher") and averages over all
tokens of the batch:

    J_DAPO = E[ 1/sum_i |y_i| * sum_i sum_t min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i) ]
    rho_it = exp(logprobs_it - old_logprobs_it)

so the loss we MINIMIZE is -sum_{i,t} w_it * min(...) with w from `token_weights`; the default
aggregation="token" divides by the batch's total completion tokens. Defaults eps_low = 0.2,
eps_high = 0.28 (DAPO paper; ScaleRL also tried 0.26). Dynamic sampling and the overlong penalty
of DAPO are not part of the loss; ScaleRL replaces them by zero-variance filtering
(scalerl/advantages.py) and interruptions.

Shapes and metrics: as in grpo.py (this calls its `clipped_surrogate_loss`).
"""

from __future__ import annotations

from torch import Tensor

from scalerl.losses.aggregation import Aggregation
from scalerl.losses.grpo import clipped_surrogate_loss


def dapo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    *,
    aggregation: Aggregation = "token",
    weights: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> tuple[Tensor, dict[str, float]]:
    """DAPO loss (to minimize): clip [1 - eps_low, 1 + eps_high], token-average by default."""
    return clipped_surrogate_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        group_ids,
        aggregation=aggregation,
        weights=weights,
        eps_low=eps_low,
        eps_high=eps_high,
    )
