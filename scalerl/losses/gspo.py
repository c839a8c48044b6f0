"""GSPO: Group Sequence Policy Optimization, a sequence-level ratio (Zheng et al. 2025).

A baseline for ScaleRL's comparisons (Khatri et al. 2025, sec. 3.2). GSPO clips a
length-normalized SEQUENCE ratio instead of per-token ratios:

    s_i    = (pi(y_i | x) / pi_old(y_i | x)) ^ (1/|y_i|) = exp( 1/|y_i| sum_t (logprobs_it - old_logprobs_it) )
    J_GSPO = E[ 1/G sum_i min(s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i) ]

with tiny clip ranges (paper: eps_low = 3e-4, eps_high = 4e-4). To fit the token-weight
aggregation of this package we use the paper's GSPO-token variant:

    s_it = sg(s_i) * pi(y_it) / sg(pi(y_it))     value s_i at every token, d s_it = s_i * d log pi(y_it)
    loss = - sum_{i,t} w_it * min(s_it * A_i, clip(s_it, 1 - eps_low, 1 + eps_high) * A_i)

With aggregation="sample" (the default; w_it = 1/(N |y_i|)) this equals -J_GSPO above in value and
gradient: the token terms of one sequence all carry the value of the sequence term, and
sum_t s_i * grad log pi(y_it) / |y_i| = grad s_i. With "prompt" or "token" aggregation each
sequence's term is instead weighted by its share of tokens. A sequence is clipped as a whole
(all its tokens share s_i). Gradient flows through logprobs only.

Shapes: logprobs, old_logprobs, mask (B, T); advantages, group_ids (B,). Off-mask positions may
hold anything (NaN included).

Metrics (no grad, over completions with at least one token): clip_fraction (sequences whose
gradient the clip removed: A > 0 and s > 1 + eps_high, or A < 0 and s < 1 - eps_low),
seq_ratio_mean, seq_ratio_min, seq_ratio_max, samples, tokens, loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scalerl.losses.aggregation import Aggregation, as_bool_mask, resolve_weights


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    *,
    aggregation: Aggregation = "sample",
    weights: Tensor | None = None,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO loss (to minimize), GSPO-token form. See the module docstring for the formula."""
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(
            f"clip bounds need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, "
            f"eps_high={eps_high}. Fix: use the GSPO paper's 3e-4 / 4e-4."
        )
    w = resolve_weights(logprobs, old_logprobs, advantages, mask, group_ids, aggregation, weights)
    valid = as_bool_mask(mask)  # (B, T)
    lengths = valid.sum(dim=1)  # (B,)
    with torch.no_grad():
        log_ratio = torch.where(valid, logprobs.detach() - old_logprobs, 0.0)  # (B, T)
        log_s = log_ratio.sum(dim=1) / lengths.clamp(min=1)  # (B,) log of the sequence ratio
    # Value log s_i at every token; gradient d logprobs_it (zero off the mask).
    log_s_tok = log_s[:, None] + torch.where(valid, logprobs - logprobs.detach(), 0.0)  # (B, T)
    s_tok = log_s_tok.exp()
    adv = advantages.to(s_tok.dtype)[:, None]  # (B, 1)
    unclipped = s_tok * adv
    clipped = s_tok.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -(w * torch.minimum(unclipped, clipped)).sum()

    with torch.no_grad():
        s = log_s.exp()  # (B,)
        a = advantages.to(s.dtype)
        has_tokens = lengths > 0
        n = has_tokens.sum().clamp(min=1)
        clipped_seq = ((s > 1.0 + eps_high) & (a > 0)) | ((s < 1.0 - eps_low) & (a < 0))
        s_valid = s[has_tokens]
        metrics = {
            "clip_fraction": float((clipped_seq & has_tokens).sum() / n),
            "seq_ratio_mean": float(s_valid.sum() / n),
            "seq_ratio_min": float(s_valid.min()) if s_valid.numel() else 0.0,
            "seq_ratio_max": float(s_valid.max()) if s_valid.numel() else 0.0,
            "samples": float(has_tokens.sum()),
            "tokens": float(lengths.sum()),
            "loss": loss.item(),
        }
    return loss, metrics
