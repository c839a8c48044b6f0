"""Policy-gradient losses for RL fine-tuning: CISPO (ScaleRL's choice) and the GRPO, DAPO and GSPO
baselines, plus token-weight aggregation (prompt / sample / token).

Every loss has the signature

    loss_fn(logprobs, old_logprobs, advantages, mask, group_ids, *, aggregation=..., weights=None,
            <its own params>) -> (loss, metrics)

with logprobs/old_logprobs/mask (B, T), advantages/group_ids (B,); the loss is to be minimized and
metrics are plain floats. Pick one by name with `compute_loss("cispo", **kwargs)`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from scalerl.losses.aggregation import AGGREGATIONS, Aggregation, token_weights
from scalerl.losses.cispo import cispo_loss
from scalerl.losses.dapo import dapo_loss
from scalerl.losses.grpo import grpo_loss
from scalerl.losses.gspo import gspo_loss

LossFn = Callable[..., tuple[Tensor, dict[str, float]]]

LOSSES: dict[str, LossFn] = {
    "cispo": cispo_loss,
    "grpo": grpo_loss,
    "dapo": dapo_loss,
    "gspo": gspo_loss,
}


def compute_loss(name: str, **kwargs) -> tuple[Tensor, dict[str, float]]:
    """Call the loss registered under `name` with keyword arguments (see each loss's signature)."""
    try:
        fn = LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}. Fix: use one of {', '.join(sorted(LOSSES))}."
        ) from None
    return fn(**kwargs)


__all__ = [
    "AGGREGATIONS",
    "LOSSES",
    "Aggregation",
    "LossFn",
    "cispo_loss",
    "compute_loss",
    "dapo_loss",
    "grpo_loss",
    "gspo_loss",
    "token_weights",
]
