"""The run flow's strategies without a Prefect server: the stage driver each pipeline.stage_tasks
mode gets (tasks/stage_drivers.py), and the role interface of the trainer and the generators,
local or remote (tasks/roles.py, tasks/trainer_nodes.py, tasks/generator_pool.py)."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future

import pytest
from prefect.futures import PrefectConcurrentFuture
from prefect.states import Completed, Failed

import tasks.stage_drivers as drivers
from scalerl.config import load_config
from storage import open_store
from tasks.generator_pool import (
    REMOTE_WAIT_S,
    LocalGenerator,
    LocalGenerators,
    RemoteGenerator,
    RemoteGenerators,
    make_generators,
)
from tasks.roles import TaskRun, TaskRunRole, wait_first
from tasks.trainer_nodes import LocalTrainer, RemoteTrainer, make_trainer


@pytest.fixture
def run(tmp_path):
    return open_store(str(tmp_path / "runs")).run("r1", create=True)


def _config(*overrides):
    return load_config(preset="tiny-cpu", overrides=list(overrides))


def _prefect_future(state=None) -> PrefectConcurrentFuture:
    """A task run's future as the flow's task runner returns it: a Prefect future over a
    concurrent one, finished with `state` (None: still running)."""
    inner = Future()
    if state is not None:
        inner.set_result(state)
    return PrefectConcurrentFuture(uuid.uuid4(), inner)


# -- stage drivers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "driver"),
    [("per_stage", drivers.PerStage), ("per_shard", drivers.PerShard), ("stream", drivers.Stream)],
)
def test_each_stage_tasks_mode_gets_its_driver(run, mode, driver):
    made = drivers.make_stage_driver(_config(f"pipeline.stage_tasks={mode}"), run)
    assert type(made) is driver
    assert made.run_id == "r1"


def test_per_shard_moves_pending_keys_in_commit_order_and_backs_off_while_idle(run, monkeypatch):
    pending, moved, waits = [["a", "b"], [], [], [], [], [], ["c"], ["d"]], [], []
    monkeypatch.setattr(drivers, "pending_keys", lambda _run: pending.pop(0))
    monkeypatch.setattr(drivers, "advance_shard", lambda _cfg, run_id, key: moved.append(key))
    monkeypatch.setattr(drivers, "wait_for_activity", waits.append)
    stages = drivers.make_stage_driver(_config("pipeline.stage_tasks=per_shard"), run)
    looks = []
    for _ in range(6):
        looks.append(stages.advance(run))
        stages.wait(looks[-1], trainer=None)
    assert looks == [True, False, False, False, False, False]
    assert moved == ["a", "b"]
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0]  # no wait after work; then it backs off
    assert stages.advance(run) and moved[-1] == "c"
    stages.wait(True, trainer=None)
    assert stages.poll == drivers.POLL_MIN_S and len(waits) == 5  # reset by work, no wait
    stages.drain(run)  # after the generators wound down: what they committed meanwhile
    assert moved == ["a", "b", "c", "d"]
    stages.finish()
    stages.close()


def test_per_stage_runs_the_three_stages_and_stops_at_a_quarantined_input(run, monkeypatch):
    calls = []

    def stage(name, out):
        return name, lambda _cfg, _run_id, key: calls.append((name, key)) or out

    monkeypatch.setattr(
        drivers,
        "STAGES",
        (stage("score", {"quarantined": "score"}), stage("curriculum", {}), stage("filter", {})),
    )
    monkeypatch.setattr(drivers, "pending_keys", lambda _run: ["k1"])
    stages = drivers.make_stage_driver(_config("pipeline.stage_tasks=per_stage"), run)
    assert stages.advance(run)
    assert calls == [("score", "k1")]  # the key goes no further
    monkeypatch.setattr(drivers, "STAGES", (stage("score", {}), stage("filter", {})))
    stages.advance(run)
    assert calls[1:] == [("score", "k1"), ("filter", "k1")]


def test_the_stream_driver_watches_its_task_and_raises_its_failure(run, monkeypatch):
    ended = []
    monkeypatch.setattr(drivers, "end_stream", ended.append)
    stages = drivers.make_stage_driver(_config("pipeline.stage_tasks=stream"), run)
    stages.task_run = TaskRun(_prefect_future())  # (start() submits advance-stream)
    assert stages.advance(run) is True  # its task moves the shards
    trainer = TaskRunRole("the trainer", lambda: _prefect_future())
    trainer.start()
    started = time.monotonic()
    stages.wait(True, trainer)  # neither ended: it looks again after STREAM_SUPERVISE_S
    assert time.monotonic() - started >= drivers.STREAM_SUPERVISE_S * 0.9

    failed = _prefect_future(Failed(data=ValueError("stage broke")))
    failed.wait()  # (its final state is then known without asking the API)
    stages.task_run = TaskRun(failed)
    with pytest.raises(ValueError, match="stage broke"):
        stages.advance(run)
    stages.drain(run)  # tells the task the run ends, then waits for it
    assert ended == ["r1"]
    with pytest.raises(ValueError, match="stage broke"):
        stages.finish()
    stages.close()
    assert ended == ["r1", "r1"]


# -- roles -----------------------------------------------------------------------------------


def test_the_local_trainer_is_a_task_run_role(run, monkeypatch):
    import tasks.train

    future = _prefect_future(Completed(data={"step": 3, "reason": "max_steps"}))

    class Submitted:
        def submit(self, config, run_id):
            assert run_id == "r1"
            return future

    monkeypatch.setattr(tasks.train, "train_policy", Submitted())
    trainer = make_trainer(_config(), run)
    assert isinstance(trainer, LocalTrainer) and trainer.where == "task run"
    trainer.start()
    assert trainer.done()
    assert trainer.waitables() == [future.wrapped_future]
    trainer.cancel()  # a local trainer stops with the run's status: nothing to do
    trainer.wait(time.monotonic() + 1.0)
    trainer.wait_for_end()
    assert trainer.result() == {"step": 3, "reason": "max_steps"}


def test_a_failed_local_role_raises_its_error_and_a_running_one_is_not_done():
    role = TaskRunRole("the trainer", lambda: _prefect_future(Failed(data=RuntimeError("oom"))))
    role.start()
    assert role.done()
    with pytest.raises(RuntimeError, match="oom"):
        role.result()
    running = TaskRunRole("the trainer", _prefect_future)
    running.start()
    assert not running.done()
    started = time.monotonic()
    running.wait(time.monotonic() + 0.2)  # a local role is waited on, never cancelled
    assert 0.15 <= time.monotonic() - started < 5


def test_local_or_remote_is_chosen_once_by_the_factories(run):
    remote = _config(
        "placement.trainer_deployment=scalerl-train-node/x",
        "placement.generators_deployment=scalerl-generate/x",
    )
    trainer, generators = make_trainer(remote, run), make_generators(remote, run)
    assert isinstance(trainer, RemoteTrainer) and trainer.where == "flow run"
    assert trainer.waitables() == []  # its state is an API call: nothing to block on
    assert isinstance(generators, RemoteGenerators) and generators.end_wait_s == REMOTE_WAIT_S
    local = make_generators(_config(), run)
    assert isinstance(local, LocalGenerators) and local.end_wait_s is None


class _Stuck(RemoteGenerator):
    """A remote generator whose flow run never ends (its machine is gone)."""

    def __init__(self, generator_id: str) -> None:
        super().__init__(generator_id, uuid.uuid4())
        self.cancelled = 0

    def state(self) -> str:
        return "running"

    def cancel(self) -> None:
        self.cancelled += 1


def test_the_remote_generators_share_one_deadline_then_are_cancelled(run):
    pool = make_generators(_config("placement.generators_deployment=scalerl-generate/x"), run)
    stuck = [_Stuck("gen0"), _Stuck("gen1")]
    pool.slots = {"gen0": [stuck[0]], "gen1": [stuck[1]]}
    pool.end_wait_s = 0.3
    started = time.monotonic()
    pool.wait_for_end()
    assert 0.25 <= time.monotonic() - started < 3  # one deadline for both, not one each
    assert [g.cancelled for g in stuck] == [1, 1]
    assert not pool.done() and pool.result() == {"gen0": "running", "gen1": "running"}


def test_the_local_pool_replaces_a_lost_generator_and_waits_on_its_task_runs(run):
    run.write_status({"state": "running"})
    launched = []

    class Pool(LocalGenerators):
        def _launch(self, generator_id, slot):
            state = Failed() if generator_id == "gen0" else Completed(data={})
            gen = LocalGenerator(generator_id, lambda: _prefect_future(state))
            gen.start()
            gen.task_run.wait()  # (its final state is then known without asking the API)
            launched.append(generator_id)
            return gen

    pool = Pool(_config("generation.num_generators=1"), run)
    pool.start()
    pool.check()  # gen0's task run ended failed: gen0-r1 takes its slot
    assert launched == ["gen0", "gen0-r1"]
    assert pool.done() and pool.result() == {"gen0-r1": "completed"}
    wait_first(pool.waitables(), 0.0)
    pool.wait_for_end()
    pool.check()  # every generator ended by itself: no more data is coming
    assert run.read_status()["state"] == "exhausted"
