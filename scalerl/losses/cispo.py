"""CISPO: truncated importance sampling + REINFORCE, the ScaleRL loss (Khatri et al. 2025, sec. 3.2).

Paper (CISPO, from MiniMax-M1, as written in ScaleRL sec. 3.2):

    J_CISPO = E[ 1/T * sum_i sum_t sg(min(rho_it, eps_max)) * A_i * log pi_train(y_it) ]
    rho_it  = pi_train(y_it) / pi_gen(y_it) = exp(logprobs_it - old_logprobs_it)

and the ScaleRL objective is the same with prompt-level aggregation, 1/T -> 1/sum_g |y_g|, and
batch-normalized advantages (see scalerl/advantages.py). Here the normalization is a weight tensor
w (B, T) from `token_weights` (aggregation.py), so the loss we MINIMIZE is

    loss = - sum_{i,t} w_it * sg(min(rho_it, eps_max)) * A_i * logprobs_it

- The ratio is capped only from above and carries no gradient: d loss / d logprobs_it =
  -w_it * min(rho_it, eps_max) * A_i, also for tokens with rho_it > eps_max (unlike PPO clipping,
  truncated tokens still contribute).
- old_logprobs come from the generator and get no gradient.
- Divided by: whatever w encodes; with aggregation="prompt" (default), each prompt's token losses
  are divided by the total tokens of that prompt's G completions, then averaged over prompts.

Shapes: logprobs, old_logprobs, mask (B, T); advantages, group_ids (B,). Positions outside the mask
may hold anything in old_logprobs (NaN included); logprobs there must be finite (they enter the
loss with weight 0).

Metrics (no grad, over mask tokens): truncated_fraction (rho > eps_max), ratio_mean, ratio_max,
tokens, loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scalerl.losses.aggregation import Aggregation, as_bool_mask, resolve_weights

_LOG_RHO_OFF_MASK = -80.0


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    *,
    aggregation: Aggregation = "prompt",
    weights: Tensor | None = None,
    eps_max: float = 4.0,
) -> tuple[Tensor, dict[str, float]]:
    """CISPO loss (to minimize) and its metrics. See the module docstring for the formula."""
    if not eps_max > 0:
        raise ValueError(
            f"eps_max must be > 0, got {eps_max}. Fix: use the paper's value 4 (5 and 8 behave alike)."
        )
    w = resolve_weights(logprobs, old_logprobs, advantages, mask, group_ids, aggregation, weights)
    valid = as_bool_mask(mask)  # (B, T)
    with torch.no_grad():
        # rho ~ 0 off the mask (exp(-80) = 1.8e-35), so masked sums/max need no second mask pass.
        # -80 rather than -inf: exp of -inf or of underflowing values takes a slow path on CPU.
        log_rho = (logprobs.detach() - old_logprobs).masked_fill_(~valid, _LOG_RHO_OFF_MASK)
        rho = log_rho.exp_()  # (B, T)
        tokens = torch.count_nonzero(valid)
        ratio_sum = rho.sum()
        row_max = rho.amax(dim=1) if rho.numel() else rho.new_zeros(rho.shape[:1])  # (B,)
        ratio_max = row_max.max() if row_max.numel() else rho.new_zeros(())
        # Count only in rows that hold a truncated token: usually few, and counting is costly.
        hot = torch.nonzero(row_max > eps_max).squeeze(1)  # (rows,)
        truncated = torch.count_nonzero(rho.index_select(0, hot) > eps_max)
        coef = rho.clamp_(max=eps_max).mul_(w).mul_(advantages.to(rho.dtype)[:, None])  # (B, T)
    # One fused multiply-reduce; its backward is a single multiply: grad = -coef.
    loss = -torch.dot(coef.to(logprobs.dtype).reshape(-1), logprobs.reshape(-1))
    with torch.no_grad():
        n = tokens.clamp(min=1)
        metrics = {
            "truncated_fraction": float(truncated / n),
            "ratio_mean": float(ratio_sum / n),
            "ratio_max": float(ratio_max),
            "tokens": float(tokens),
            "loss": loss.item(),
        }
    return loss, metrics
