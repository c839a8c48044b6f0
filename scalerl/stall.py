"""Stall guard: a run whose batches never make a trainer step stops and says why.

A batch in which every group's rewards are equal (zero variance) gives no gradient, so the
trainer takes no step and publishes no new version (SCALERL.md sec. 5: no replacement prompts
are drawn). When that happens for `trainer.stall_batches` batches in a row, nothing will change:
the policy that produces the batches is the same one. Typical causes: every reward is 0 because
the scorer cannot read the answers (e.g. a data file whose answers are floats, "invalid literal
for int()") or the model never solves a prompt; every reward is 1 because the prompts are too
easy. The guard stops the run with one line naming the cause, instead of generating forever.

    guard = StallGuard(limit=200)
    message = guard.no_step(batch.table)   # None until `limit` batches in a row made no step
    guard.stepped()                        # a step happened: start counting again
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

SCORER_FAILURES = ("error", "timeout", "crash")


class RunStalledError(ValueError):
    """The run stopped because it could not learn (a ValueError: retrying cannot help)."""  # reward_reason "<failure>: detail" (rewards/)


def scorer_failure(reason: str | None) -> str | None:
    """The reason of a reward whose scorer failed (not a wrong answer), else None."""
    if reason and reason.split(":", 1)[0] in SCORER_FAILURES:
        return reason
    return None


def count_scorer_failures(table: pa.Table) -> int:
    if "reward_reason" not in table.column_names:
        return 0
    return sum(scorer_failure(r) is not None for r in table.column("reward_reason").to_pylist())


@dataclass
class StallGuard:
    limit: int  # 0: never stop
    batches: int = 0
    samples: int = 0
    rewards: Counter = field(default_factory=Counter)  # reward value -> completions
    failures: Counter = field(default_factory=Counter)  # scorer failure reason -> completions

    def stepped(self) -> None:
        self.batches, self.samples = 0, 0
        self.rewards.clear()
        self.failures.clear()

    def no_step(self, table: pa.Table) -> str | None:
        """Count a batch that made no step; the stop message once `limit` are in a row."""
        self.batches += 1
        self.samples += table.num_rows
        self.rewards.update(float(r) for r in table.column("reward").to_pylist() if r is not None)
        if "reward_reason" in table.column_names:
            self.failures.update(
                f for f in map(scorer_failure, table.column("reward_reason").to_pylist()) if f
            )
        if self.limit and self.batches >= self.limit:
            return self.message()
        return None

    def message(self) -> str:
        n, s = self.batches, self.samples
        if len(self.rewards) == 1:
            (value,) = self.rewards
            what = f"every reward in {n} batches ({s:,} completions) was {value:g}"
        else:
            what = (
                f"every group in {n} batches ({s:,} completions) had equal rewards "
                f"(values seen: {', '.join(f'{v:g}' for v in sorted(self.rewards))})"
            )
        parts = [f"no trainer step for {n} batches in a row: {what}"]
        if self.failures:
            total = sum(self.failures.values())
            top, count = self.failures.most_common(1)[0]
            parts.append(
                f"{total:,} scorer errors, most often ({count:,}x) {top[:120]!r}. Fix: the "
                "scorer cannot read these answers: check data.task and the answer column "
                "against a few completions (`scalerl rollouts show RUN`), e.g. numbers "
                "written as floats (142.0) for task arithmetic"
            )
        elif set(self.rewards) == {max(self.rewards)} and max(self.rewards) > 0:
            parts.append(
                "Fix: every prompt is already solved: use harder prompts, or check that the "
                "scorer is not too lenient"
            )
        else:
            parts.append(
                "Fix: the policy never solves a prompt: start from a stronger (e.g. "
                "warm-started) model, use easier prompts or more samples per prompt, and check "
                "a few completions with `scalerl rollouts show RUN`"
            )
        return "; ".join(parts) + "."
