"""Generator backpressure (tasks/rollouts.py): start a batch only if it can still be trained.

The rule, written out: the new batch is trained at step trainer_step + unread + in_flight +
(generators - 1) at the earliest (trainer_step: where the trainer's next unread shard goes), and its oldest token is from version `loaded` or newer; it
is used only if that step - loaded <= k. With nothing queued for the trainer it always starts.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from runtime.generator import LeadGate, may_start_batch
from runtime.trainer_io import INTAKE_MARKER
from scalerl.config import load_config
from scalerl.engines.base import Throttled
from storage import open_store
from tests.tasks.test_trainer_io import _shard


@pytest.mark.parametrize(
    "unread, in_flight, trainer_step, loaded, k, generators",
    [  # an engine never holds weights newer than the trainer's step: loaded <= trainer_step
        c
        for c in itertools.product([0, 1, 2, 5], [0, 1], [0, 3, 7], [0, 2, 3, 7], [0, 2, 8], [1, 2])
        if c[3] <= c[2]
    ],
)
def test_rule_matches_the_staleness_bound(unread, in_flight, trainer_step, loaded, k, generators):
    earliest_step = trainer_step + unread + in_flight + (generators - 1)
    expected = unread + in_flight == 0 or earliest_step - loaded <= k
    got = may_start_batch(
        unread=unread,
        in_flight=in_flight,
        trainer_step=trainer_step,
        loaded=loaded,
        k=k,
        generators=generators,
    )
    assert got == expected


@pytest.mark.parametrize(
    "unread, in_flight, generators, max_queued",
    list(itertools.product([0, 1, 2, 3], [0, 1], [1, 2], [None, 1, 2, 3])),
)
def test_a_queue_bound_holds_generators_before_k_does(unread, in_flight, generators, max_queued):
    # k far away (trainer_step = loaded, k = 8): only the queue bound can refuse
    queued = unread + in_flight + (generators - 1)  # batches ahead of the new one
    expected = unread + in_flight == 0 or max_queued is None or queued + 1 <= max_queued
    got = may_start_batch(
        unread=unread,
        in_flight=in_flight,
        trainer_step=5,
        loaded=5,
        k=8,
        generators=generators,
        max_queued=max_queued,
    )
    assert got == expected


def test_k0_is_lockstep_and_a_starving_trainer_is_never_kept_waiting():
    # synchronous: one batch at a time, from the newest weights
    assert may_start_batch(unread=0, in_flight=0, trainer_step=4, loaded=4, k=0, generators=1)
    assert not may_start_batch(unread=0, in_flight=1, trainer_step=4, loaded=4, k=0, generators=1)
    assert not may_start_batch(unread=1, in_flight=0, trainer_step=4, loaded=4, k=0, generators=1)
    # weights far behind, but the trainer has nothing coming: start anyway (no deadlock)
    assert may_start_batch(unread=0, in_flight=0, trainer_step=9, loaded=1, k=2, generators=3)


class _Weights(Throttled):
    def __init__(self):
        super().__init__(source=SimpleNamespace(poll=lambda: None), interval_s=60.0)
        self.expedited = 0

    def expedite(self) -> None:
        super().expedite()
        self.expedited += 1


def test_gate_reads_the_run_store(tmp_path):
    config = load_config(preset="tiny-cpu", overrides=["pipeline.max_off_policy_steps=2"])
    assert config.pipeline.max_queued_batches == 2  # the preset's queue bound: tested last
    config.pipeline.max_queued_batches = None  # k alone first
    run = open_store(str(tmp_path / "runs")).run("io-run", create=True)
    for v in range(4):  # the trainer published v0..v3: it trains step 3 next
        d = tmp_path / f"w{v}"
        d.mkdir()
        (d / "config.json").write_text("{}")
        run.publish_weights(v, d)
    for i in range(3):
        run.commit_shard("raw", f"gen0-{i:06d}", _shard(f"gen0-{i:06d}", [f"g{i}"]))
    run.write_marker(INTAKE_MARKER, {"stage": "filtered", "shards_read": 2})  # 1 unread
    engine, weights = SimpleNamespace(version=3), _Weights()
    gate = LeadGate(run, config, engine, weights, interval_s=0.0)
    # 3 + 1 unread + 0 in flight - 3 = 1 <= 2; with one in flight 2 <= 2; with two, 3 > 2
    assert gate(0) and gate(1) and not gate(2)
    assert weights.expedited == 0  # refused for the queue, not for old weights
    engine.version = 2  # weights one behind: 3 + 1 + 1 - 2 = 3 > 2
    assert not gate(1) and weights.expedited == 1  # and the engine is told to look now
    run.write_marker(INTAKE_MARKER, {"stage": "filtered", "shards_read": 3})  # trainer read it
    assert gate(1)  # 3 + 0 + 1 - 2 = 2 <= 2
    # the trainer took its batch for step 3 and trains it: unread shards now go to step 4
    run.write_marker(INTAKE_MARKER, {"stage": "filtered", "shards_read": 3, "next_step": 4})
    engine.version = 3
    assert gate(1) and not gate(2)  # 4 + 0 + 1 - 3 = 2 <= 2; 4 + 0 + 2 - 3 = 3 > 2
    # the preset's queue bound (2): one unread + one in flight fills it, whatever k allows
    config.pipeline.max_off_policy_steps = 8
    run.write_marker(INTAKE_MARKER, {"stage": "filtered", "shards_read": 2, "next_step": 3})
    gate = LeadGate(run, config, engine, weights, interval_s=0.0)
    assert gate(1) and gate(2)  # k = 8 alone: 3 + 1 + 2 - 3 = 3 <= 8
    config.pipeline.max_queued_batches = 2
    gate = LeadGate(run, config, engine, weights, interval_s=0.0)
    assert gate(0) and not gate(1)  # 1 unread + 0 in flight + 1 <= 2; 1 + 1 + 1 > 2


def test_gate_looks_at_the_store_at_most_once_per_interval_while_it_refuses(tmp_path):
    config = load_config(preset="tiny-cpu", overrides=["pipeline.max_off_policy_steps=0"])
    run = open_store(str(tmp_path / "runs")).run("io-run", create=True)
    d = tmp_path / "w0"
    d.mkdir()
    (d / "config.json").write_text("{}")
    run.publish_weights(0, d)
    gate = LeadGate(run, config, SimpleNamespace(version=0), _Weights(), interval_s=3600.0)
    assert not gate(1)  # a batch in flight at k = 0
    run.commit_shard("raw", "gen0-000000", _shard("gen0-000000", ["g0"]))
    run.write_marker(INTAKE_MARKER, {"stage": "filtered", "shards_read": 1})
    assert not gate(0)  # would pass now, but the last refusal was under an hour ago
    gate._refused_at = float("-inf")
    assert gate(0)


def test_the_gate_counts_live_registered_generators_wherever_they_run(tmp_path, monkeypatch):
    """num_generators says 1; three generators registered (one started by hand from another
    machine): the gate counts three, so each new batch has two others' batches ahead of it.
    One whose heartbeat is older than GENERATOR_TTL_S is not counted any more."""
    import time as _time

    from runtime import generator as rollouts
    from runtime.registry import GENERATOR_TTL_S, GeneratorRegistration, live_generators

    monkeypatch.setattr(rollouts, "COUNT_EVERY_S", 0.0)
    config = load_config(preset="tiny-cpu", overrides=["pipeline.max_off_policy_steps=3"])
    config.pipeline.max_queued_batches = None
    assert config.generation.num_generators == 1
    run = open_store(str(tmp_path / "runs")).run("io-run", create=True)
    d = tmp_path / "w0"
    d.mkdir()
    (d / "config.json").write_text("{}")
    run.publish_weights(0, d)
    run.commit_shard("raw", "gen0-000000", _shard("gen0-000000", ["g0"]))
    run.write_marker(INTAKE_MARKER, {"stage": "filtered", "shards_read": 0, "next_step": 0})
    gate = LeadGate(run, config, SimpleNamespace(version=0), _Weights(), interval_s=0.0)
    # alone: 0 + 1 unread + 1 in flight + (1 - 1) = 2 <= 3
    assert gate(1)
    regs = [GeneratorRegistration(run, g) for g in ("gen0", "gen1", "hostB-0")]
    assert sorted(live_generators(run)) == ["gen0", "gen1", "hostB-0"]
    assert regs[2].doc["host"] and regs[2].doc["pid"]
    # three: 0 + 1 + 1 + (3 - 1) = 4 > 3
    assert gate.generators == 3 and not gate(1)
    assert gate(0)  # 0 + 1 + 0 + 2 = 3 <= 3
    # gen1 died: its heartbeat ages past the TTL; a clean end (release) leaves at once
    regs[1]._stop.set()  # its process died: no more heartbeats
    stale = {**regs[1].doc, "heartbeat": _time.time() - GENERATOR_TTL_S - 1}
    run.write_marker("generator-gen1", stale)
    regs[2].release()
    assert sorted(live_generators(run)) == ["gen0"]
    assert gate.generators == 1 and gate(1)
