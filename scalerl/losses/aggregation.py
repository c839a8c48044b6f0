"""Loss aggregation: how per-token losses become one number, expressed as token weights.

Every loss in this package is ``loss = sum_{i,t} w_it * token_loss_it`` with a weight tensor
``w`` of shape (B, T) that is zero outside the completion mask. The three modes compared in the
ScaleRL paper (sec. 3.2, "loss aggregation") differ only in ``w``:

    prompt  (ScaleRL):  w_it = m_it / (P * sum_{j in g(i)} |y_j|)
            mean over prompts of [sum of the prompt's token losses / tokens of its G completions]
    sample  (GRPO):     w_it = m_it / (N * |y_i|)
            mean over samples of [mean over the sample's tokens]
    token   (DAPO):     w_it = m_it / sum_j |y_j|
            sum over all tokens / total tokens

with m the 0/1 mask, |y_i| = sum_t m_it, g(i) the group (prompt) of row i, P the number of
groups with at least one token and N the number of rows with at least one token. Rows without
tokens get weight 0 and are not counted as samples or prompts; a batch without tokens gives w = 0
(never NaN).

Why weights instead of a reduction inside each loss: the trainer computes ``w`` once over the
WHOLE batch and hands each micro-batch its row slice, so the sum of micro-batch losses (and their
gradients) equals the full-batch loss exactly, whatever the micro-batch boundaries.

    w = token_weights(mask, group_ids, "prompt", keep=result.keep)   # whole batch, (B, T)
    for rows in micro_batches:
        loss, metrics = cispo_loss(..., weights=w[rows])
        loss.backward()

Rows dropped by zero-variance filtering must not count as prompts: pass ``keep`` (or zero their
mask) when computing the weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["prompt", "sample", "token"]
AGGREGATIONS: tuple[str, ...] = ("prompt", "sample", "token")


def token_weights(
    mask: Tensor,
    group_ids: Tensor,
    mode: Aggregation,
    *,
    keep: Tensor | None = None,
) -> Tensor:
    """Weights w (B, T), zero outside the mask, such that sum(w * token_loss) aggregates by `mode`.

    mask: (B, T) bool or 0/1 float, the completion tokens. group_ids: (B,) integer, same id = same
    prompt. keep: optional (B,) bool; rows with keep False get weight 0 and do not count.
    """
    _check_mask_and_groups(mask, group_ids)
    if mode not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation mode {mode!r}. Fix: use one of {', '.join(AGGREGATIONS)}."
        )
    # bool -> uint8 -> float32 is ~3x faster on CPU than bool -> float32; copy: m is modified below.
    m = (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).to(torch.float32, copy=True)
    if keep is not None:
        if keep.shape != group_ids.shape:
            raise ValueError(
                f"keep has shape {tuple(keep.shape)} but group_ids has {tuple(group_ids.shape)}. "
                "Fix: pass one bool per row (completion)."
            )
        m.mul_(keep.to(device=m.device, dtype=m.dtype)[:, None])
    lengths = m.sum(dim=1)  # (B,) tokens per completion
    # Counts are integers >= 1 wherever a row has tokens; the clamps only guard empty rows/batches,
    # whose weights are 0 anyway because m is 0 there.
    if mode == "token":
        row_scale = (1.0 / lengths.sum().clamp(min=1.0)).expand_as(lengths)  # (B,)
    elif mode == "sample":
        n_samples = (lengths > 0).sum().clamp(min=1)
        row_scale = 1.0 / (lengths.clamp(min=1.0) * n_samples)  # (B,)
    else:
        uniq, dense = torch.unique(group_ids, return_inverse=True)  # dense: (B,) in [0, n_groups)
        group_tokens = lengths.new_zeros(uniq.numel()).index_add_(0, dense, lengths)  # (n_groups,)
        n_prompts = (group_tokens > 0).sum().clamp(min=1)
        row_scale = 1.0 / (group_tokens[dense].clamp(min=1.0) * n_prompts)  # (B,)
    return m.mul_(row_scale[:, None])  # (B, T)


def resolve_weights(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    aggregation: Aggregation,
    weights: Tensor | None,
) -> Tensor:
    """Check the common loss inputs and return the (B, T) weights (given, or computed from mask)."""
    if logprobs.dim() != 2:
        raise ValueError(
            f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}. "
            "Fix: pass one row of token log-probs per completion, padded to a common length."
        )
    shape = logprobs.shape
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask)):
        if t.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but logprobs has {tuple(shape)}. "
                f"Fix: pad {name} exactly like logprobs."
            )
    for name, t in (("advantages", advantages), ("group_ids", group_ids)):
        if t.shape != shape[:1]:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected ({shape[0]},). "
                "Fix: pass one value per completion (row)."
            )
    if weights is None:
        return token_weights(mask, group_ids, aggregation).to(logprobs.dtype)
    if weights.shape != shape:
        raise ValueError(
            f"weights has shape {tuple(weights.shape)} but logprobs has {tuple(shape)}. "
            "Fix: slice the full-batch token_weights(...) with the same rows as logprobs."
        )
    return weights.to(logprobs.dtype)


def _check_mask_and_groups(mask: Tensor, group_ids: Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(
            f"mask must be (B, T), got shape {tuple(mask.shape)}. "
            "Fix: pass one row per completion, True/1 on completion tokens."
        )
    if group_ids.shape != mask.shape[:1]:
        raise ValueError(
            f"group_ids has shape {tuple(group_ids.shape)}, expected ({mask.shape[0]},). "
            "Fix: pass one group (prompt) id per completion."
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(
            f"group_ids must be an integer tensor, got {group_ids.dtype}. "
            "Fix: pass torch.int64 prompt/group ids."
        )


def as_bool_mask(mask: Tensor) -> Tensor:
    """The mask as bool (no copy when it already is)."""
    return mask if mask.dtype == torch.bool else mask != 0
