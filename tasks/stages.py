"""The per-shard stages: score -> filter -> curriculum update.

Each is a Prefect task of its own (pipeline.stage_tasks = per_stage, three task runs per
shard), or the three run in order inside one advance-shard task run (per_shard): the same
functions (`task.fn`), the same commits, a third of the orchestration cost.

Each reads one committed shard and commits one output under the same key, so a retried or
re-run stage overwrites nothing and duplicates nothing: the store treats an identical re-commit
as a no-op, and each task first checks whether its output already exists. There is no Prefect
result cache on purpose: Prefect keeps it across sessions, and a key of (run, stage, shard)
would make a run deleted and started again under the same id skip its stages forever; the
store's own check is the one source of truth.

Corrupt input: when a stage's input shard cannot be used (CorruptShardError: truncated, altered
or missing data file; SchemaVersionError; ForeignFileError: another run's rows; InvalidRollouts
Error), the stage quarantines it (Run.quarantine_shard: data and commit record moved to
quarantine/{stage}/{key}/ with the reason), logs a warning and returns {"quarantined": stage,
"reason": ...} instead of failing, so one bad file does not stop the run. The flow stops moving
that key along; the run report and `scalerl runs verify` list it. Unreachable storage is not
corruption: it propagates (the store waits out short outages, then the task's retries apply).
"""

from __future__ import annotations

from prefect import get_run_logger, task

from scalerl.config import RunConfig
from scalerl.faults import kill_point
from storage.errors import (
    CorruptShardError,
    ForeignFileError,
    InvalidRolloutsError,
    SchemaVersionError,
    ShardNotFoundError,
)
from tasks.common import open_run

RAW, SCORED, FILTERED = "raw", "scored", "filtered"
UNUSABLE = (CorruptShardError, SchemaVersionError, ForeignFileError, InvalidRolloutsError)


def read_or_quarantine(run, stage: str, key: str, by: str):
    """(table, None) for the committed shard `stage/key`, or (None, result) once it is in
    quarantine: put there now because it cannot be used (UNUSABLE errors), or earlier (a retried
    task). Anything else, unreachable storage included, propagates."""
    try:
        return run.read_shard(stage, key), None
    except UNUSABLE as e:
        doc = run.quarantine_shard(stage, key, e, by=by)
        get_run_logger().warning(
            "quarantined %s/%s (%s): %s; the run continues without it",
            stage,
            key,
            doc.get("error") or type(e).__name__,
            doc.get("reason"),
        )
    except ShardNotFoundError:
        if key not in run.quarantined_keys(stage):
            raise
        doc = [d for d in run.list_quarantined(stage) if d["key"] == key][-1]
    return None, {"key": key, "quarantined": stage, "reason": doc.get("reason", "")}


@task(
    name="score-shard",
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    timeout_seconds=1800,
    cache_policy=None,  # idempotent through the store; see the module docstring
)
def score_shard(config: RunConfig, run_id: str, key: str) -> dict:
    """Verifiable reward of every completion in raw/{key} -> scored/{key}."""
    import pyarrow as pa

    from scalerl.rewards import score_many

    run = open_run(config, run_id)
    if run.has_shard(SCORED, key):
        return {"key": key, "skipped": True}
    table, quarantined = read_or_quarantine(run, RAW, key, "score-shard")
    if quarantined:
        return quarantined
    rows = table.select(["prompt", "answer", "task"]).to_pylist()
    rewards = score_many(rows, table.column("completion").to_pylist())
    out = (
        table.set_column(
            table.schema.get_field_index("reward"),
            "reward",
            pa.array([r.value for r in rewards], pa.float32()),
        )
        .set_column(
            table.schema.get_field_index("passed"),
            "passed",
            pa.array([r.passed for r in rewards], pa.bool_()),
        )
        .set_column(
            table.schema.get_field_index("reward_reason"),
            "reward_reason",
            pa.array([r.reason for r in rewards], pa.string()),
        )
    )
    kill_point("scorer.before_commit")
    run.commit_shard(SCORED, key, out)
    passed = sum(r.passed for r in rewards)
    get_run_logger().info("scored %s: %d/%d passed", key, passed, len(rewards))
    return {"key": key, "rows": len(rewards), "passed": passed}


@task(
    name="filter-shard",
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    timeout_seconds=600,
    cache_policy=None,  # idempotent through the store; see the module docstring
)
def filter_shard(config: RunConfig, run_id: str, key: str) -> dict:
    """Annotate scored/{key} with `filter_reason` -> filtered/{key}.

    Rows are annotated, not removed: zero-variance groups stay in the shard (the trainer counts
    them in its batch and gives them no gradient, as the paper does: no replacement sampling),
    and rows the trainer must never use (no completion tokens) are marked too.
    """
    from scalerl.filtering import filter_reasons

    run = open_run(config, run_id)
    if run.has_shard(FILTERED, key):
        return {"key": key, "skipped": True}
    table, quarantined = read_or_quarantine(run, SCORED, key, "filter-shard")
    if quarantined:
        return quarantined
    annotated, counts = filter_reasons(table, zero_variance=config.algorithm.zero_variance_filter)
    kill_point("filter.before_commit")
    run.commit_shard(FILTERED, key, annotated)
    return {"key": key, **counts}


@task(
    name="update-curriculum",
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    timeout_seconds=600,
    cache_policy=None,  # idempotent through the store; see the module docstring
)
def update_curriculum(config: RunConfig, run_id: str, key: str) -> dict:
    """Fold scored/{key}'s per-prompt pass rates into the No-Positive-Resampling state.

    The committed state lists the shards already applied, so applying a shard twice (a retry
    after a crash between commit and return) changes nothing. Calls must be serialized per run
    (the run flow does so); the store refuses a second, different state under the same version.
    """
    from scalerl.curriculum import NoPositiveResampling

    run = open_run(config, run_id)
    version, state = run.load_curriculum()
    if key in state["applied"]:
        return {"key": key, "skipped": True, "version": version}
    sampler = NoPositiveResampling.from_state_dict(state["sampler"])
    scored, quarantined = read_or_quarantine(run, SCORED, key, "update-curriculum")
    if quarantined:
        return quarantined
    table = scored.select(["group_id", "prompt_id", "passed"]).to_pylist()
    groups: dict[str, tuple[str, list[bool]]] = {}
    for row in table:
        groups.setdefault(row["group_id"], (row["prompt_id"], []))[1].append(bool(row["passed"]))
    retired = []
    if config.algorithm.no_positive_resampling:
        for prompt_id, passes in groups.values():
            if sampler.update(prompt_id, passes):
                retired.append(prompt_id)
    kill_point("curriculum.before_commit")
    run.save_curriculum(
        {"sampler": sampler.state_dict(), "applied": [*state["applied"], key]}, version + 1
    )
    if retired:
        get_run_logger().info(
            "curriculum v%d: retired %d prompt(s) at pass rate >= %.2f",
            version + 1,
            len(retired),
            config.algorithm.pass_rate_threshold,
        )
    return {
        "key": key,
        "version": version + 1,
        "retired": len(retired),
        "active": len(sampler.active_ids),
        "exhausted": sampler.exhausted,
    }


STAGES = (("score", score_shard), ("curriculum", update_curriculum), ("filter", filter_shard))


@task(
    name="advance-shard",
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    timeout_seconds=1800,
    cache_policy=None,  # idempotent through the store; see the module docstring
)
def advance_shard(config: RunConfig, run_id: str, key: str) -> dict:
    """score -> curriculum -> filter for raw/{key} in one task run (pipeline.stage_tasks =
    per_shard). Each stage commits its own output and skips what is already committed, so a
    retry resumes at the first stage not yet done. Stops at a quarantined input and returns
    {"quarantined": stage, ...} as the stage did; a failure names the stage."""
    out: dict = {"key": key}
    for name, stage in STAGES:
        try:
            result = stage.fn(config, run_id, key)
        except Exception as e:
            get_run_logger().error("shard %s: stage %s failed: %r", key, name, e)
            raise
        out[name] = result
        if "quarantined" in result:
            out["quarantined"], out["reason"] = result["quarantined"], result.get("reason", "")
            break
    return out
