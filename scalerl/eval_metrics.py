"""Evaluation-set metrics over k samples per prompt: mean@K, pass@K and maj@K.

Each metric is computed per prompt and averaged over the prompts of a set:

- mean@K: the share of the first K samples that passed (K = n: the mean pass rate).
- pass@K: the unbiased estimator of "at least one of K samples passes" from n >= K samples
  with c passes (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"):
  1 - C(n-c, K) / C(n, K), computed as the product 1 - prod_{i=n-c+1}^{n} (1 - K / i), which
  never forms the large binomials.
- maj@K: majority vote over the final answers of the first K samples (see `majority_passed`).

"First K" is in sample_index order. A prompt with fewer than K samples uses all it has (K is
clipped to its n; evaluations draw the configured samples_per_prompt for every prompt, so this
only happens with a hand-made table).

Use:
    from scalerl.eval_metrics import set_metrics
    set_metrics(records, [("mean", 16), ("pass", 1), ("maj", 16)])
    # {"mean@16": 0.41, "pass@1": 0.41, "maj@16": 0.55}
where records are dicts with prompt_id, sample_index, passed and (for maj@K) completion and task.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

KINDS = ("mean", "pass", "maj")


def metric_name(kind: str, k: int) -> str:
    """Column name of a metric, e.g. metric_name("pass", 8) == "pass@8"."""
    if kind not in KINDS:
        raise ValueError(f"metric kind {kind!r} is not one of {KINDS}. Fix: use mean, pass or maj.")
    return f"{kind}@{k}"


def _check_k(n: int, k: int) -> int:
    if k < 1:
        raise ValueError(f"K = {k} is below 1. Fix: report a metric with K >= 1.")
    return min(k, n)


def mean_at_k(passed: Sequence[bool], k: int) -> float:
    """Share of the first k samples of one prompt that passed."""
    k = _check_k(len(passed), k)
    return sum(bool(p) for p in passed[:k]) / k if k else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with n samples of which c passed:
    1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i); 1 when n - c < k."""
    if not 0 <= c <= n:
        raise ValueError(f"c = {c} passes of n = {n} samples. Fix: 0 <= c <= n.")
    k = _check_k(n, k)
    if n == 0:
        return 0.0
    if n - c < k:
        return 1.0  # every set of k samples holds a pass
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def normalize_answer(answer: str | None) -> str | None:
    """An extracted answer with runs of whitespace made one space and the ends stripped; None
    for no answer or an empty one."""
    if answer is None:
        return None
    text = re.sub(r"\s+", " ", answer).strip()
    return text or None


def majority_passed(answers: Sequence[str | None], passed: Sequence[bool], k: int) -> bool:
    """maj@K of one prompt. The rule: among the first k samples, those with an answer vote for
    it (answers compared after normalize_answer, as strings: '0.5' and '1/2' are two answers);
    a sample without an answer does not vote. The answer with the most votes wins; a tie goes
    to the answer seen first. The prompt is solved when the winning answer's first sample
    passed (its verifier verdict); unsolved when no sample has an answer."""
    k = _check_k(len(answers), k)
    votes: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers[:k]):
        answer = normalize_answer(answer)
        if answer is None:
            continue
        votes[answer] = votes.get(answer, 0) + 1
        first.setdefault(answer, i)
    if not votes:
        return False
    # max keeps the first of equal counts; dicts keep first-seen order
    winner = max(votes, key=lambda a: votes[a])
    return bool(passed[first[winner]])


def final_answer(completion: str | None, task: str | None, prompt: str | None = None) -> str | None:
    """The answer a sample votes for: the verifiers' extraction rule
    (scalerl.rewards.base.extract_final_answer; the last line for countdown expressions), with
    the rendered prompt, so an answer inside thinking the prompt opened does not vote."""
    from scalerl.rewards.base import extract_final_answer

    if completion is None:
        return None
    fallback = "line" if task == "countdown" else "number"
    return extract_final_answer(completion, fallback=fallback, prompt=prompt)


def group_samples(records: Iterable[Mapping]) -> list[list[Mapping]]:
    """The records of each prompt, prompts in first-seen order, samples by sample_index."""
    groups: dict[str, list[Mapping]] = {}
    for r in records:
        groups.setdefault(r["prompt_id"], []).append(r)
    return [sorted(g, key=lambda r: r["sample_index"]) for g in groups.values()]


def set_metrics(records: Iterable[Mapping], metric_ks: Sequence[tuple[str, int]]) -> dict:
    """{metric_name(kind, K): mean over prompts} for each (kind, K) of `metric_ks`. Records are
    the scored eval rows of one set (prompt_id, sample_index, passed; completion and task for
    maj@K); a null `passed` counts as failed. No records: every metric is None."""
    groups = group_samples(records)
    out: dict[str, float | None] = {}
    for kind, k in metric_ks:
        name = metric_name(kind, k)
        if not groups:
            out[name] = None
            continue
        values = []
        for g in groups:
            passed = [bool(r["passed"]) for r in g]
            if kind == "mean":
                values.append(mean_at_k(passed, k))
            elif kind == "pass":
                values.append(pass_at_k(len(passed), sum(passed), k))
            else:
                answers = [
                    final_answer(r.get("completion"), r.get("task"), r.get("prompt")) for r in g
                ]
                values.append(float(majority_passed(answers, passed, k)))
        out[name] = sum(values) / len(values)
    return out
