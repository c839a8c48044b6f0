"""How many evaluations run at once: one while the trainer trains; after it, CPU evaluations in
their own processes use every core (the tiny-cpu demo's queued evaluations at the end)."""

import os

import pytest

from flows.run import evaluation_slots
from scalerl.config import load_config


def test_one_at_a_time_while_training_then_every_core_on_cpu():
    cfg = load_config(preset="tiny-cpu")
    assert evaluation_slots(cfg, training_done=False) == 1
    cores, threads = len(os.sched_getaffinity(0)), cfg.pipeline.torch_threads
    assert evaluation_slots(cfg, training_done=True) == min(4, max(1, cores // threads))


@pytest.mark.parametrize(
    "override",
    [
        "generation.engine=vllm",  # an engine per evaluation process: memory on a GPU
        "placement.accelerator=cuda",
        "pipeline.isolation=thread",  # in-process evaluations share one engine
    ],
)
def test_stays_one_where_evaluations_share_a_device_or_an_engine(override):
    cfg = load_config(preset="tiny-cpu", overrides=[override])
    assert evaluation_slots(cfg, training_done=True) == 1


def test_unset_threads_means_one_and_slots_are_capped(monkeypatch):
    import flows.run

    # torch_threads unset: every evaluation already uses every core
    cfg = load_config(preset="tiny-cpu", overrides=["pipeline.torch_threads=null"])
    assert cfg.pipeline.torch_threads is None
    assert evaluation_slots(cfg, training_done=True) == 1
    # a 64-core host, one thread each: no more than MAX_EVAL_SLOTS model copies at once
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    cfg = load_config(preset="tiny-cpu")
    assert evaluation_slots(cfg, training_done=True) == flows.run.MAX_EVAL_SLOTS == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2})  # 3 cores allowed
    assert evaluation_slots(cfg, training_done=True) == 3
