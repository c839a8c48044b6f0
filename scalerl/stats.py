"""Rollout statistics per policy version, staleness from trainer metrics, and the eval curve
points: what `scalerl rollouts stats` and `scalerl curve ...` show. Plain Arrow in, plain
numbers out (no storage access here).

    by_version = version_stats(table)         # table: rollout rows (any stage)
    hist = staleness_histogram(trainer_rows)  # {staleness d: samples trained at d}
    compute, pass_rate, steps = eval_points(eval_rows)

Grouping: a completion belongs to the policy version it started with, `min_version` (the
version the staleness rule v - min_version <= k uses). `version_span` is max_version -
min_version: how many weight updates landed while the completion was being generated
(PipelineRL's in-flight updates; 0 when generation is synchronous). Staleness at training time
(trainer step v - min_version) is known only to the trainer, which writes its histogram to the
trainer metrics as columns `staleness/{d}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_STALENESS_COL = re.compile(r"staleness/([0-9]+)")


@dataclass(frozen=True)
class VersionStats:
    """Rollouts that started at one policy version."""

    version: int
    rollouts: int
    reward_mean: float | None
    """Mean reward over scored rows; None when no row is scored (raw stage)."""
    pass_rate: float | None
    completion_tokens_mean: float
    thinking_tokens_mean: float
    answer_tokens_mean: float
    truncation_rate: float
    """Share with finish_reason 'length' (ScaleRL keeps it under 5%)."""
    interruption_rate: float
    """Share with finish_reason 'interrupted' (thinking budget reached)."""
    version_span_mean: float
    """Mean of max_version - min_version."""


def _np(table: pa.Table, name: str, dtype=float) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(dtype)


def completion_lengths(table: pa.Table) -> np.ndarray:
    """Completion tokens per row: column `completion_tokens` if present, else from the ids."""
    if "completion_tokens" in table.column_names:
        return _np(table, "completion_tokens")
    return (
        pc.list_value_length(table.column("completion_token_ids"))
        .to_numpy(zero_copy_only=False)
        .astype(float)
    )


def _nanmean(x: np.ndarray) -> float | None:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else None


def version_stats(table: pa.Table) -> list[VersionStats]:
    """One VersionStats per min_version present in `table`, ascending."""
    if table.num_rows == 0:
        return []
    start = _np(table, "min_version", np.int64)
    span = _np(table, "max_version", np.int64) - start
    reward = np.array([np.nan if r is None else r for r in table.column("reward").to_pylist()])
    passed = np.array(
        [np.nan if p is None else float(p) for p in table.column("passed").to_pylist()]
    )
    lengths = completion_lengths(table)
    thinking, answer = _np(table, "thinking_tokens"), _np(table, "answer_tokens")
    reason = np.asarray(table.column("finish_reason").to_pylist(), dtype=object)
    out = []
    for v in np.unique(start):
        rows = start == v
        out.append(
            VersionStats(
                version=int(v),
                rollouts=int(rows.sum()),
                reward_mean=_nanmean(reward[rows]),
                pass_rate=_nanmean(passed[rows]),
                completion_tokens_mean=float(lengths[rows].mean()),
                thinking_tokens_mean=float(thinking[rows].mean()),
                answer_tokens_mean=float(answer[rows].mean()),
                truncation_rate=float(np.mean(reason[rows] == "length")),
                interruption_rate=float(np.mean(reason[rows] == "interrupted")),
                version_span_mean=float(span[rows].mean()),
            )
        )
    return out


def _staleness_columns(trainer: pa.Table) -> dict[int, str]:
    found = {}
    for name in trainer.column_names:
        match = _STALENESS_COL.fullmatch(name)
        if match:
            found[int(match.group(1))] = name
    return dict(sorted(found.items()))


def staleness_histogram(trainer: pa.Table) -> dict[int, int]:
    """Samples trained at each staleness d = step - min_version, summed over all trainer rows
    (columns staleness/{d}; missing values count 0). Empty when the rows have no such columns."""
    return {d: int(np.nansum(_np(trainer, col))) for d, col in _staleness_columns(trainer).items()}


def staleness_by_step(trainer: pa.Table) -> dict[int, float]:
    """Mean staleness of the samples trained at each trainer step (the latest row per step)."""
    cols = _staleness_columns(trainer)
    if not cols or "step" not in trainer.column_names:
        return {}
    d = np.array(list(cols), dtype=float)
    counts = np.nan_to_num(np.stack([_np(trainer, c) for c in cols.values()], axis=1))  # (n, K)
    out = {}
    for step, row in zip(_np(trainer, "step", np.int64), counts, strict=True):
        if row.sum() > 0:
            out[int(step)] = float(row @ d / row.sum())
    return out


def eval_points(evals: pa.Table) -> tuple[list[float], list[float], list[int]]:
    """(compute, pass_rate, step) of the `eval` metrics rows, sorted by step; when a step was
    evaluated twice (a retried task) the latest row wins."""
    if evals.num_rows == 0 or not {"step", "compute", "pass_rate"} <= set(evals.column_names):
        return [], [], []
    by_step = {}
    for row in evals.select(["step", "compute", "pass_rate"]).to_pylist():
        if None not in row.values():
            by_step[int(row["step"])] = (float(row["compute"]), float(row["pass_rate"]))
    steps = sorted(by_step)
    return [by_step[s][0] for s in steps], [by_step[s][1] for s in steps], steps
