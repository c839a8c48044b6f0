"""How the run flow moves raw shards through score -> curriculum -> filter (tasks/stages.py): one
driver per pipeline.stage_tasks mode, chosen once, each with the same small interface.

    stages = make_stage_driver(config, run)   # per_stage, per_shard or stream
    stages.start()                # first: scored shards the curriculum lacks are applied again
    moved = stages.advance(run)   # each look of the run flow's loop: move what is pending
    stages.wait(moved, trainer)   # between two looks (what the loop waits on)
    stages.drain(run)             # the generators have wound down: what they committed meanwhile
    stages.finish()               # raise the stages' own failure (after the trainer's)
    stages.close()                # the run flow failed: stop

per_stage: three task runs per shard (score-shard, update-curriculum, filter-shard); per_shard:
one advance-shard task run per shard; both are driven by the loop, in commit order (the
curriculum sees one writer), and sit on the critical path between generator and trainer, so the
loop wakes on a generator's commit (runtime.isolated.notify_flow) and otherwise polls, fast while
shards flow and backing off while idle (an idle run does not hammer S3). stream: one persistent
advance-stream task run moves every shard; the loop only watches it, off the critical path.

Every driver's start() first applies the scored shards that the newest intact curriculum state
lacks (rebuild_curriculum): none normally; after the newest curriculum file was deleted or
damaged, the shards applied after the version the store falls back to, so a resume rebuilds
the lost versions before the loop moves anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from prefect import get_run_logger
from prefect.utilities.annotations import quote

from runtime.isolated import wait_for_activity
from scalerl.config import RunConfig
from tasks.roles import Role, TaskRun, wait_first
from tasks.stages import (
    RAW,
    SCORED,
    STAGES,
    advance_shard,
    advance_stream,
    end_stream,
    open_stream,
    pending_keys,
    update_curriculum,
)

POLL_MIN_S, POLL_MAX_S = 0.05, 1.0  # idle polling backs off from MIN to MAX, reset on work
STREAM_SUPERVISE_S = 0.5  # stage_tasks = stream: the loop only supervises, off the critical path


class StageDriver(ABC):
    """Moves the run's raw shards through the stages (see the module docstring)."""

    def __init__(self, config: RunConfig, run) -> None:
        # quote: Prefect would otherwise walk the whole config (a pydantic tree) looking for
        # futures on every submission, up to three per shard
        self.config, self.run_id, self.quoted = config, run.run_id, quote(config)
        self.run = run

    def start(self) -> None:
        """Before the loop's first look: rebuild the curriculum state (rebuild_curriculum)."""
        rebuild_curriculum(self.quoted, self.run)

    @abstractmethod
    def advance(self, run) -> bool:
        """Move what is pending; whether shards moved (or may have: a stream's task moves
        them). Raises when the stages cannot go on."""

    @abstractmethod
    def wait(self, moved: bool, trainer: Role) -> None:
        """Between two looks of the loop, which ends when `trainer` does."""

    @abstractmethod
    def drain(self, run) -> None:
        """The generators have wound down: move what they committed meanwhile."""

    def finish(self) -> None:  # noqa: B027 - by default: nothing to do
        """Raise the stages' own failure, if any (after drain)."""

    def close(self) -> None:  # noqa: B027 - by default: nothing to do
        """The run flow failed: stop moving shards."""


class PendingShards(StageDriver):
    """The loop moves every pending shard itself, one submission per shard (per_shard) or per
    stage (per_stage); its idle looks back off from POLL_MIN_S to POLL_MAX_S."""

    def __init__(self, config: RunConfig, run) -> None:
        super().__init__(config, run)
        self.poll = POLL_MIN_S

    @abstractmethod
    def _advance_key(self, key: str) -> None:
        """score -> curriculum -> filter for raw/{key}, stopping at a quarantined input."""

    def advance(self, run) -> bool:
        todo = pending_keys(run)
        for key in todo:
            self._advance_key(key)
        return bool(todo)

    def wait(self, moved: bool, trainer: Role) -> None:
        # a generator's commit wakes the loop at once; otherwise it polls
        self.poll = POLL_MIN_S if moved else min(2 * self.poll, POLL_MAX_S)
        if not moved:
            wait_for_activity(self.poll)

    def drain(self, run) -> None:
        self.advance(run)


class PerStage(PendingShards):
    """Three task runs per shard: score-shard, update-curriculum, filter-shard."""

    def _advance_key(self, key: str) -> None:
        for _, stage in STAGES:  # the order advance_shard runs them in, as three task runs
            if "quarantined" in stage(self.quoted, self.run_id, key):
                break  # its input was unusable and is in quarantine: the key goes no further


class PerShard(PendingShards):
    """One advance-shard task run per shard (the same three stages, a third of the cost)."""

    def _advance_key(self, key: str) -> None:
        advance_shard(self.quoted, self.run_id, key)


class Stream(StageDriver):
    """One advance-stream task run for the whole run; the loop only watches it."""

    task_run: TaskRun | None = None

    def start(self) -> None:
        super().start()  # before the stream: it is then the curriculum's one writer
        open_stream(self.run_id)
        self.task_run = TaskRun(advance_stream.submit(self.quoted, self.run_id))

    def advance(self, run) -> bool:
        if self.task_run.failed():
            self.task_run.result()  # raises its error: the stages cannot go on, nor the run
        return True  # its task moves them

    def wait(self, moved: bool, trainer: Role) -> None:
        # nothing on the critical path here: look twice a second, or when either ends (a
        # stream that returned because the run failed is not waited on)
        wait_first([*trainer.waitables(), self.task_run.waitable], STREAM_SUPERVISE_S)

    def drain(self, run) -> None:
        end_stream(self.run_id)  # it drains what the generators committed, then returns
        self.task_run.wait()

    def finish(self) -> None:
        self.task_run.result()  # its failure fails the run

    def close(self) -> None:
        end_stream(self.run_id)


def unapplied_keys(run) -> list[str]:
    """Scored shards the newest intact curriculum state has not applied, in the order the
    stages apply them (raw commit order; a scored shard whose raw one is gone last)."""
    found = run.load_curriculum()
    if found is None:
        return []
    applied = set(found[1]["applied"])
    todo = [s.key for s in run.list_shards(SCORED) if s.key not in applied]
    if not todo:
        return []
    order = {s.key: i for i, s in enumerate(run.list_shards(RAW))}
    return sorted(todo, key=lambda k: order.get(k, len(order)))


def rebuild_curriculum(config, run) -> list[str]:
    """Apply the scored shards the newest intact curriculum state lacks, each as an
    update-curriculum task run, in the order the stages would; returns their keys. Normally
    none: a shard is applied right after it is scored. After the newest curriculum file was
    deleted, or damaged (load_curriculum then falls back to the newest intact version), these
    are the shards applied after that version; applying them again rebuilds the lost versions
    (the first save moves a damaged file aside) before any new shard is applied."""
    keys = unapplied_keys(run)
    if keys:
        get_run_logger().warning(
            "curriculum: %d scored shard(s) are not in the newest intact curriculum state "
            "(v%d; a newer file was deleted or damaged): applying them again, e.g. %s",
            len(keys),
            run.load_curriculum()[0],
            keys[0],
        )
    for key in keys:
        update_curriculum(config, run.run_id, key)
    return keys


DRIVERS = {"per_stage": PerStage, "per_shard": PerShard, "stream": Stream}


def make_stage_driver(config: RunConfig, run) -> StageDriver:
    """The driver for config.pipeline.stage_tasks (the one place that looks at it)."""
    return DRIVERS[config.pipeline.stage_tasks](config, run)
