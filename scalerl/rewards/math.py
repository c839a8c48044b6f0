"""Math answers checked with math-verify, bounded in time by worker processes.

``MathScorer.score(row, completion)``: the completion's final answer (base.py's rule:
after ``</think>`` (none while the completion, or a prompt ending in ``<think>``, leaves the
thinking open), last ``\\boxed{}``, else "Answer: X", else the last number) and
``row["answer"]`` are each wrapped as ``\\boxed{...}``, parsed with
``math_verify.parse`` and compared with ``math_verify.verify`` (symbolic / numeric
equivalence: ``1/2`` == ``\\frac{1}{2}`` == ``0.5``, ``1,000`` == ``1000``).

Threads and time. math-verify bounds its own time with ``signal.alarm``, which only
works on a process's main thread; from a Prefect worker thread it raises. So we pass
``parsing_timeout=None`` / ``timeout_seconds=None`` and run the check in a
``ScoringPool`` worker process (on its main thread) with a per-item deadline: a
runaway sympy expression such as ``10^{(10^{100})}`` is killed at ``timeout_s`` and
scores 0 with reason "timeout: ...". ``score`` is therefore safe from any thread;
``score_inline`` does the same check in the calling process with no time bound and
is what the workers run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

from scalerl.rewards.base import MAX_ANSWER_CHARS, Reward, correct, extract_final_answer, wrong

# We disable math-verify's own timeouts on purpose (see above); its warning about that
# would otherwise be logged once per worker.
logging.getLogger("math_verify").setLevel(logging.ERROR)


class MathScorer:
    """Equivalence of the final answer and row["answer"] by math-verify, in a worker."""

    name = "math"

    def __init__(self, *, timeout_s: float = 5.0, pool: Any | None = None) -> None:
        self.timeout_s = timeout_s
        self.pool = pool  # a ScoringPool; None uses the shared default pool

    def score(self, row: Mapping[str, Any], completion: str) -> Reward:
        from scalerl.rewards.pools import default_pool, to_reward

        if not isinstance(completion, str):
            return wrong(f"completion is {type(completion).__name__}, not text")
        row = {"prompt": row.get("prompt", ""), "answer": row["answer"], "task": self.name}
        pool = self.pool if self.pool is not None else default_pool()
        (outcome,) = pool.run(_score_inline, [(row, completion)], timeout_s=self.timeout_s)
        return to_reward(outcome)

    def score_inline(self, row: Mapping[str, Any], completion: str) -> Reward:
        """The check itself, in this process, unbounded in time: run it in a worker."""
        if not isinstance(completion, str):
            return wrong(f"completion is {type(completion).__name__}, not text")
        found = extract_final_answer(completion, prompt=row.get("prompt"))
        if found is None:
            return wrong("no final answer")
        if len(found) > MAX_ANSWER_CHARS:
            return wrong("final answer too long")
        gold = _parse_gold(str(row["answer"]))
        if not gold:
            return wrong(f"could not parse the reference answer {str(row['answer'])[:60]!r}")
        pred = _parse(found)
        if not pred:
            return wrong(f"could not parse the final answer {found[:60]!r}")
        from math_verify import verify

        if verify(gold, pred, timeout_seconds=None):
            return correct()
        return wrong(f"wrong answer: got {found[:60]!r}, expected {str(row['answer'])[:60]!r}")


def _parse(text: str) -> list[Any]:
    from math_verify import parse

    text = text.strip().strip("$").strip()
    return parse("\\boxed{" + text + "}", parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(text: str) -> list[Any]:
    # The same reference answer is checked G times per prompt: parse it once per worker.
    return _parse(text)


def _score_inline(row: Mapping[str, Any], completion: str) -> Reward:
    """What a pool worker runs for MathScorer.score (a module-level function: it is pickled)."""
    return MathScorer().score_inline(row, completion)
