"""Advantages: group centering, zero-variance filtering and normalization (ScaleRL sec. 3.2, 5).

For prompt x with G completions and rewards r_1..r_G (ScaleRL, Khatri et al. 2025):

    A_i      = r_i - mean(r_j : j in the group of i)          group centering (no per-group std)
    A_i^norm = A_i / (std({A_j : j kept in the batch}) + eps)  batch-level normalization (default)

Alternatives compared in the paper: per-group std (GRPO, A_i / (std of its group + eps)) and none
(Dr. GRPO). Zero-variance filtering drops every group whose rewards are all equal (they have
A = 0 and no learning signal); the paper writes it as "0 < mean(r) < 1" for 0/1 rewards, we test
"max(r) == min(r)" so -1/+1 (paper appendix) or any other reward scale behaves the same.

Choices (the paper leaves them open):
- std is the POPULATION std (divide by n, torch correction=0): defined for a single sample, and
  for a batch of 768 it differs from the unbiased estimate by 0.07%.
- The batch std is taken over the KEPT samples only (after zero-variance filtering), matching
  "only prompts with 0 < mean(r) < 1 contribute". With filter_zero_variance=False every sample
  is kept, so zero-variance groups (A = 0) pull the std down.
- Dropped samples get advantage 0 and keep=False. A std of 0 (nothing kept, or all A = 0) gives
  A = 0 / (0 + eps) = 0, never NaN.

Use:
    result = compute_advantages(rewards, group_ids)             # rewards (N,), group_ids (N,)
    w = token_weights(mask, group_ids, "prompt", keep=result.keep)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Normalization = Literal["batch", "group", "none"]
NORMALIZATIONS: tuple[str, ...] = ("batch", "group", "none")


@dataclass(frozen=True)
class AdvantageResult:
    """Per-completion advantages after centering, filtering and normalization."""

    advantages: Tensor
    """(N,) float32; 0 for dropped samples."""
    keep: Tensor
    """(N,) bool; False for samples of zero-variance groups when filtering is on."""
    groups_total: int
    """Number of distinct groups (prompts) in the batch."""
    groups_zero_variance: int
    """Groups whose rewards are all equal (counted whether or not they were filtered)."""
    samples_kept: int
    """Number of samples with keep=True."""
    std: float
    """Population std of the kept centered advantages (the divisor in "batch" mode)."""


def _dense_groups(group_ids: Tensor) -> tuple[Tensor, int]:
    """(N,) ids in [0, n_groups) and n_groups."""
    uniq, dense = torch.unique(group_ids, return_inverse=True)
    return dense, uniq.numel()


def _group_sum(values: Tensor, dense: Tensor, n_groups: int) -> Tensor:
    return values.new_zeros(n_groups).index_add_(0, dense, values)  # (n_groups,)


def _check(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be "
            "(N,). Fix: pass one reward and one group (prompt) id per completion."
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(
            f"group_ids must be an integer tensor, got {group_ids.dtype}. Fix: pass torch.int64 ids."
        )
    if not torch.isfinite(rewards).all():
        raise ValueError(
            "rewards contain NaN or inf. Fix: score every completion with a finite reward "
            "(e.g. 0 for unparsable answers) before computing advantages."
        )


def group_centered(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """A_i = r_i - mean of the rewards in i's group. (N,) float32."""
    _check(rewards, group_ids)
    r = rewards.to(torch.float32)
    dense, n_groups = _dense_groups(group_ids)
    counts = _group_sum(torch.ones_like(r), dense, n_groups)
    mean = _group_sum(r, dense, n_groups) / counts  # (n_groups,); every group has >= 1 sample
    return r - mean[dense]


def zero_variance_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """(N,) bool: True where all rewards of the sample's group are equal (any reward scale)."""
    _check(rewards, group_ids)
    r = rewards.to(torch.float32)
    dense, n_groups = _dense_groups(group_ids)
    hi = r.new_full((n_groups,), float("-inf")).scatter_reduce_(0, dense, r, "amax")
    lo = r.new_full((n_groups,), float("inf")).scatter_reduce_(0, dense, r, "amin")
    return (hi == lo)[dense]


def normalize(
    advantages: Tensor,
    group_ids: Tensor,
    mode: Normalization,
    keep: Tensor | None = None,
    eps: float = 1e-8,
) -> tuple[Tensor, float]:
    """Scale advantages by the batch std, their group's std, or not at all.

    Stds are population stds over the kept samples (all samples when keep is None). Returns the
    (N,) float32 advantages (0 where keep is False) and the batch std of the kept samples (the
    divisor in "batch" mode, reported for logging in the others; 0.0 when nothing is kept).
    """
    _check(advantages, group_ids)
    if mode not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization {mode!r}. Fix: use one of {', '.join(NORMALIZATIONS)}."
        )
    a = advantages.to(torch.float32)
    k = torch.ones_like(a, dtype=torch.bool) if keep is None else keep.to(torch.bool)
    if k.shape != a.shape:
        raise ValueError(
            f"keep has shape {tuple(k.shape)} but advantages has {tuple(a.shape)}. "
            "Fix: pass one bool per sample."
        )
    a = torch.where(k, a, 0.0)
    kf = k.to(torch.float32)
    n = kf.sum()
    if n > 0:
        mean = a.sum() / n
        batch_std = torch.sqrt((((a - mean) * kf) ** 2).sum() / n)
    else:
        batch_std = a.new_zeros(())

    if mode == "batch":
        out = a / (batch_std + eps)
    elif mode == "group":
        dense, n_groups = _dense_groups(group_ids)
        counts = _group_sum(kf, dense, n_groups).clamp(min=1.0)
        g_mean = _group_sum(a, dense, n_groups) / counts  # (n_groups,)
        g_var = _group_sum(((a - g_mean[dense]) * kf) ** 2, dense, n_groups) / counts
        out = a / (g_var.sqrt()[dense] + eps)
    else:
        out = a
    return torch.where(k, out, 0.0), float(batch_std)


def compute_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    normalization: Normalization = "batch",
    filter_zero_variance: bool = True,
) -> AdvantageResult:
    """Group-centered, zero-variance-filtered, normalized advantages (ScaleRL defaults)."""
    centered = group_centered(rewards, group_ids)  # (N,)
    zero_var = zero_variance_groups(rewards, group_ids)  # (N,)
    keep = ~zero_var if filter_zero_variance else torch.ones_like(zero_var)
    advantages, std = normalize(centered, group_ids, normalization, keep=keep)
    dense, n_groups = _dense_groups(group_ids)
    zero_var_groups = torch.zeros(n_groups, dtype=torch.bool, device=dense.device)
    zero_var_groups[dense] = zero_var
    return AdvantageResult(
        advantages=advantages,
        keep=keep,
        groups_total=n_groups,
        groups_zero_variance=int(zero_var_groups.sum()),
        samples_kept=int(keep.sum()),
        std=std,
    )
