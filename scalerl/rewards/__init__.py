"""Verifiable rewards: scorers by task name and batched, process-isolated scoring.

    from scalerl.rewards import score_many, get_scorer, make_arithmetic
    rows = make_arithmetic(100, seed=0)            # dicts with prompt_id, prompt, answer, task
    rewards = score_many(rows, completions)         # list[Reward], one per completion

``score_many`` dispatches on ``row["task"]`` (see ``SCORERS``) and runs every check in
a ``ScoringPool`` worker process with a per-item deadline (``timeout_s``): a check
that runs too long or crashes its worker scores 0 with reason "timeout: ..." or
"crash: ...", and the worker is replaced. Garbage completions score 0 with a reason;
only bad *rows* (missing keys, unknown task) or mismatched lengths raise ValueError.

Pools: without ``pool=``, a shared pool per worker count is started on first use and
reused (closed at interpreter exit or by ``close_default_pools()``). Pass your own
``ScoringPool`` (a context manager) to control its lifetime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from scalerl.rewards.base import Reward, Scorer, check_row, extract_final_answer, wrong
from scalerl.rewards.math import MathScorer
from scalerl.rewards.pools import close_default_pools, default_pool, to_reward
from scalerl.rewards.sandbox import ScoringPool
from scalerl.rewards.synthetic import (
    ArithmeticScorer,
    CountdownScorer,
    countdown_answer,
    make_arithmetic,
    make_countdown,
)

__all__ = [
    "SCORERS",
    "ArithmeticScorer",
    "CountdownScorer",
    "MathScorer",
    "Reward",
    "Scorer",
    "ScoringPool",
    "close_default_pools",
    "countdown_answer",
    "default_pool",
    "extract_final_answer",
    "get_scorer",
    "make_arithmetic",
    "make_countdown",
    "score_many",
]

SCORERS: dict[str, Scorer] = {
    "math": MathScorer(),
    "arithmetic": ArithmeticScorer(),
    "countdown": CountdownScorer(),
}


def get_scorer(task: str) -> Scorer:
    """The scorer registered for ``task``; ValueError listing the valid names otherwise."""
    try:
        return SCORERS[task]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown reward task {task!r}. Fix: set the row's task to one of {sorted(SCORERS)}."
        ) from None


def score_inline(task: str, row: Mapping[str, Any], completion: str) -> Reward:
    """Score one item in this process, unbounded in time (what the pool's workers run)."""
    scorer = get_scorer(task)
    inline = getattr(scorer, "score_inline", scorer.score)
    return inline(row, completion)


def score_many(
    rows: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    *,
    timeout_s: float = 5.0,
    workers: int | None = None,
    pool: ScoringPool | None = None,
) -> list[Reward]:
    """One Reward per (row, completion), each checked in a worker with a deadline."""
    if len(rows) != len(completions):
        raise ValueError(
            f"score_many got {len(rows)} rows and {len(completions)} completions. "
            "Fix: pass one row per completion (repeat a prompt's row for each of its G samples)."
        )
    for row in rows:
        check_row(row)
        get_scorer(row["task"])
    rewards: list[Reward | None] = [None] * len(rows)
    calls: list[tuple[Any, ...]] = []
    where: list[int] = []
    for i, (row, completion) in enumerate(zip(rows, completions, strict=True)):
        if not isinstance(completion, str):
            rewards[i] = wrong(f"completion is {type(completion).__name__}, not text")
            continue
        # Only what the verifiers read crosses the pipe (rows may carry token ids).
        small = {"prompt": row["prompt"], "answer": row["answer"], "task": row["task"]}
        calls.append((row["task"], small, completion))
        where.append(i)
    if calls:
        pool = pool if pool is not None else default_pool(workers)
        for i, outcome in zip(
            where, pool.run(score_inline, calls, timeout_s=timeout_s), strict=True
        ):
            rewards[i] = to_reward(outcome)
    return rewards  # type: ignore[return-value]
