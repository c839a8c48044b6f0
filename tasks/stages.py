"""The per-shard stages: score -> filter -> curriculum update.

Each is a Prefect task of its own (pipeline.stage_tasks = per_stage, three task runs per
shard), or the three run in order inside one advance-shard task run (per_shard): the same
functions (`task.fn`), the same commits, a third of the orchestration cost. With `stream`, one
advance-stream task run, persistent like the generators and the trainer, runs them on every raw
shard as it lands: the same commits again, and no task run per shard at all.

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

import logging
import threading
import time

from prefect import get_run_logger, task

from runtime.common import open_run
from runtime.isolated import notify_children
from scalerl.config import RunConfig
from scalerl.faults import kill_point
from storage.errors import (
    CorruptShardError,
    ForeignFileError,
    InvalidRolloutsError,
    SchemaVersionError,
    ShardNotFoundError,
)

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
    return _score(config, run_id, key)[0]


def _score(config: RunConfig, run_id: str, key: str, run=None):
    """score_shard's work; also returns the scored table it committed (None if it committed
    none), which the stages after it in the same call use instead of reading it back. `run`:
    the Run when the caller has it open (advance_shard: one open per shard, not per stage; on
    an object store each open is a request)."""
    import pyarrow as pa

    from scalerl.rewards import score_many

    run = run or open_run(config, run_id)
    if run.has_shard(SCORED, key):
        return {"key": key, "skipped": True}, None
    table, quarantined = read_or_quarantine(run, RAW, key, "score-shard")
    if quarantined:
        return quarantined, None
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
    _per_shard_log("scored %s: %d/%d passed", key, passed, len(rewards))
    return {"key": key, "rows": len(rewards), "passed": passed}, out


@task(
    name="filter-shard",
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    timeout_seconds=600,
    cache_policy=None,  # idempotent through the store; see the module docstring
)
def filter_shard(config: RunConfig, run_id: str, key: str, scored=None) -> dict:
    """Annotate scored/{key} with `filter_reason` -> filtered/{key}.

    Rows are annotated, not removed: zero-variance groups stay in the shard (the trainer counts
    them in its batch and gives them no gradient, as the paper does: no replacement sampling),
    and rows the trainer must never use (no completion tokens) are marked too. `scored`: the
    table of scored/{key} when the caller has just committed it (advance_shard), else read.
    """
    return _filter(config, run_id, key, scored)


def _filter(config: RunConfig, run_id: str, key: str, scored=None, run=None) -> dict:
    """filter_shard's work. With `scored` (committed by the caller just now) filtered/{key}
    cannot exist yet, so it is not asked for (a commit of it by a racing writer would be told
    apart by the commit itself: identical content is accepted, different content refused)."""
    from scalerl.filtering import filter_reasons

    run = run or open_run(config, run_id)
    if scored is None and run.has_shard(FILTERED, key):
        return {"key": key, "skipped": True}
    table, quarantined = (
        (scored, None)
        if scored is not None
        else read_or_quarantine(run, SCORED, key, "filter-shard")
    )
    if quarantined:
        return quarantined
    annotated, counts = filter_reasons(table, zero_variance=config.algorithm.zero_variance_filter)
    kill_point("filter.before_commit")
    run.commit_shard(FILTERED, key, annotated)
    notify_children()  # the trainer (a child of this flow process) reads it now, not at a poll
    return {"key": key, **counts}


@task(
    name="update-curriculum",
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    timeout_seconds=600,
    cache_policy=None,  # idempotent through the store; see the module docstring
)
def update_curriculum(
    config: RunConfig, run_id: str, key: str, scored=None, live: dict | None = None
) -> dict:
    """Fold scored/{key}'s per-prompt pass rates into the No-Positive-Resampling state.

    The committed state lists the shards already applied, so applying a shard twice (a retry
    after a crash between commit and return) changes nothing. The state is the newest intact
    version: a damaged newest file is skipped (Run.load_curriculum) and this shard's state is
    saved over it, the damaged file moved aside. Calls must be serialized per run
    (the run flow does so); the store refuses a second, different state under the same version.
    `scored`: the table of scored/{key} when the caller has just committed it, else read.
    `live`: a dict the caller keeps between calls (advance-stream, the run's one curriculum
    writer): the state this function last committed, kept in it instead of loaded and parsed
    again per shard (with 2,048 prompts that was most of the stage's CPU). Cleared on any error,
    so the next call loads the committed state; a stale one cannot commit (the store refuses a
    different state under a version already committed).
    """
    return _update_curriculum(config, run_id, key, scored, live)


def _update_curriculum(
    config: RunConfig, run_id: str, key: str, scored=None, live: dict | None = None, run=None
) -> dict:
    """update_curriculum's work (`run`: as for _score)."""
    from scalerl.curriculum import NoPositiveResampling

    run = run or open_run(config, run_id)
    if live:
        version, applied, sampler = live["version"], live["applied"], live["sampler"]
    else:
        found = run.load_curriculum()  # the newest intact version (a damaged file is skipped)
        if found is None:
            raise RuntimeError(
                f"run {run_id} has no intact curriculum state under {run.url}/curriculum/. "
                f"Fix: `scalerl resume {run_id}` (preparing the run writes v0 again; the "
                "scored shards are then applied again)."
            )
        version, state = found
        applied = state["applied"]
        sampler = NoPositiveResampling.from_state_dict(state["sampler"])
    if key in applied:
        return {"key": key, "skipped": True, "version": version}
    if live is not None:
        live.clear()  # refilled after the commit: the sampler is about to change
    scored, quarantined = (
        (scored, None)
        if scored is not None
        else read_or_quarantine(run, SCORED, key, "update-curriculum")
    )
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
    applied = [*applied, key]
    run.save_curriculum({"sampler": sampler.state_dict(), "applied": applied}, version + 1)
    if live is not None:
        live.update(version=version + 1, applied=applied, sampler=sampler)
    if retired:
        _per_shard_log(
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
def advance_shard(
    config: RunConfig, run_id: str, key: str, live: dict | None = None, run=None
) -> dict:
    """score -> curriculum -> filter for raw/{key} in one task run (pipeline.stage_tasks =
    per_shard). Each stage commits its own output and skips what is already committed, so a
    retry resumes at the first stage not yet done. Stops at a quarantined input and returns
    {"quarantined": stage, ...} as the stage did; a failure names the stage. `live`: passed to
    update_curriculum (advance-stream keeps the curriculum state there between shards). `run`:
    the Run when the caller has it open (advance-stream), else opened once here."""
    out: dict = {"key": key}
    scored = None  # scored/{key} as committed by this call: the later stages need not read it
    run = run or open_run(config, run_id)  # once for the three stages
    for name, stage in STAGES:
        try:
            if stage is score_shard:
                result, scored = _score(config, run_id, key, run=run)
            elif stage is update_curriculum:
                result = _update_curriculum(config, run_id, key, scored, live, run=run)
            else:
                result = _filter(config, run_id, key, scored, run=run)
        except Exception as e:
            get_run_logger().error("shard %s: stage %s failed: %r", key, name, e)
            raise
        out[name] = result
        if "quarantined" in result:
            out["quarantined"], out["reason"] = result["quarantined"], result.get("reason", "")
            break
    return out


_QUIET = threading.local()  # set inside advance-stream: per-shard lines go to DEBUG


def _per_shard_log(msg: str, *args) -> None:
    """A per-shard line: INFO in a stage's own task run, DEBUG inside advance-stream (which
    logs a summary instead: a log line per shard costs the Prefect server and the flow process
    more than scoring a tiny model's shard)."""
    level = logging.DEBUG if getattr(_QUIET, "on", False) else logging.INFO
    get_run_logger().log(level, msg, *args)


def done_keys(run) -> set[str]:
    """Raw shards through the stages: filtered or quarantined."""
    return {s.key for s in run.list_shards(FILTERED)} | run.quarantined_keys()


def pending_keys(run) -> list[str]:
    """Raw shards not yet through the stages (neither filtered nor quarantined), in commit order."""
    done = done_keys(run)
    return [s.key for s in run.list_shards(RAW) if s.key not in done]


STREAM_POLL_MIN_S, STREAM_POLL_MAX_S = 0.05, 1.0  # without a wake-up: fast while shards flow
STREAM_REPORT_S = 10.0  # advance-stream's summary line: at most this often
_STREAM_END: dict[str, threading.Event] = {}  # run id -> set by the flow: drain once, return


def open_stream(run_id: str) -> None:
    """Arm a fresh end signal for the advance-stream task the flow is about to submit (one left
    set by an earlier flow run of the same run id in this process must not end the new one)."""
    _STREAM_END[run_id] = threading.Event()


def end_stream(run_id: str) -> None:
    """Tell the run's advance-stream task (same process) that no more raw shards will come:
    it advances what is pending and returns."""
    from runtime.isolated import notify_flow

    _STREAM_END.setdefault(run_id, threading.Event()).set()
    notify_flow()  # in the flow process: wakes the stream's wait at once


@task(
    name="advance-stream",
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    cache_policy=None,  # idempotent through the store; see the module docstring
)
def advance_stream(config: RunConfig, run_id: str) -> dict:
    """pipeline.stage_tasks = stream: score -> curriculum -> filter every raw shard as it lands,
    in commit order (the curriculum's one writer), for as long as the run runs.

    Persistent, like the generators and the trainer: one task run for the whole run instead of
    one per shard (on a 2-core machine a task run cost more CPU, in the flow process and the
    Prefect server, than the three stages of a tiny model's shard). Each stage still commits its
    own output and skips what is committed, so a Prefect retry of this task (or a resumed run)
    carries on at the first stage not yet done of the first shard not yet through. A generator's
    commit wakes it (runtime.isolated.notify_flow); otherwise it polls, backing off while idle.
    Returns when the flow calls end_stream(run_id), after one last pass, or at once when the
    run has failed. The flow watches it: if it fails for good, the run fails."""
    from runtime.isolated import wait_for_activity

    run, logger = open_run(config, run_id), get_run_logger()
    end = _STREAM_END.setdefault(run_id, threading.Event())
    # keys through the stages: listed once, then kept here (this task is the only one moving
    # them), so a pass lists only raw/
    done = done_keys(run)
    totals = {"shards": 0, "rows": 0, "passed": 0, "retired": 0, "quarantined": 0}
    curriculum: dict = {}  # the state it last committed (update_curriculum's `live`)
    poll, reported, last_report = STREAM_POLL_MIN_S, 0, time.monotonic()
    _QUIET.on = True
    try:
        while True:
            ending = end.is_set()  # read before the pass: a pass after end_stream drains all
            todo = [s.key for s in run.list_shards(RAW) if s.key not in done]
            for key in todo:
                out = advance_shard.fn(config, run_id, key, live=curriculum, run=run)
                done.add(key)
                totals["shards"] += 1
                totals["quarantined"] += "quarantined" in out
                totals["rows"] += out.get("score", {}).get("rows", 0)
                totals["passed"] += out.get("score", {}).get("passed", 0)
                totals["retired"] += out.get("curriculum", {}).get("retired", 0)
            if totals["shards"] > reported and (
                ending or time.monotonic() - last_report >= STREAM_REPORT_S
            ):
                logger.info(
                    "advance-stream: %d shard(s) through the stages (%d since the last line); "
                    "%d/%d completions passed, %d prompt(s) retired, %d shard(s) quarantined",
                    totals["shards"],
                    totals["shards"] - reported,
                    totals["passed"],
                    totals["rows"],
                    totals["retired"],
                    totals["quarantined"],
                )
                reported, last_report = totals["shards"], time.monotonic()
            if ending:
                return totals
            if not todo and (run.read_status() or {}).get("state") == "failed":
                return {**totals, "stopped": "the run failed"}
            poll = STREAM_POLL_MIN_S if todo else min(2 * poll, STREAM_POLL_MAX_S)
            if not todo:
                wait_for_activity(poll)
    finally:
        _QUIET.on = False
