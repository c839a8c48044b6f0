"""A resume rebuilds a curriculum whose newest file was deleted or damaged: the stage driver's
start (what every run flow, and so every resume, does before its loop) applies the scored
shards the newest intact state lacks, in the order the stages applied them, and the state it
commits equals the one that was lost. Real advance-shard and update-curriculum task runs under
the session's Prefect server, real files; raw shards are built through the store API (no model
needed: the score stage scores them)."""

import datetime as dt

import pytest
from prefect import flow

from runtime.verify import verify_run
from scalerl.config import load_config
from scalerl.curriculum import NoPositiveResampling
from storage import open_store, rollouts_from_records

pytestmark = [pytest.mark.integration]

RUN = "rebuild"
KEYS = [f"gen0-{i:06d}" for i in range(3)]
PROMPTS = [f"p{i}" for i in range(4)]


def _raw(key: str, shard: int):
    """Two groups of two: prompt p{shard} and p{shard+1}; the first group passes both."""
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return rollouts_from_records(
        [
            {
                "run_id": RUN,
                "shard_id": key,
                "prompt_id": PROMPTS[shard + i // 2],
                "group_id": f"{key}-g{i // 2}",
                "sample_index": i % 2,
                "task": "arithmetic",
                "prompt": "1+1?",
                "prompt_token_ids": [1, 2],
                "answer": "2",
                "completion": "2" if i < 2 else "3",
                "completion_token_ids": [5, 6],
                "logprobs": [-0.1, -0.2],
                "versions": [0, 0],
                "finish_reason": "stop",
                "thinking_tokens": 1,
                "answer_tokens": 1,
                "generator_id": "gen0",
                "started_at": t0,
                "finished_at": t0,
            }
            for i in range(4)
        ]
    )


@pytest.fixture
def advanced(tmp_path, prefect_harness):
    """A run whose three raw shards went through the stages: curriculum v0..v3."""
    from tasks.stages import advance_shard

    cfg = load_config(
        preset="tiny-cpu",
        overrides=[f"storage.url={tmp_path / 'runs'}", "pipeline.stage_tasks=per_shard"],
    )
    run = open_store(str(tmp_path / "runs")).run(RUN, create=True)
    sampler = NoPositiveResampling(
        PROMPTS, pass_rate_threshold=cfg.algorithm.pass_rate_threshold, seed=0
    )
    run.save_curriculum({"sampler": sampler.state_dict(), "applied": []}, 0)
    for i, key in enumerate(KEYS):
        run.commit_shard("raw", key, _raw(key, i))
        advance_shard(cfg, RUN, key)
    assert run.list_curriculum_versions() == [0, 1, 2, 3]
    return cfg, run, tmp_path / "runs" / RUN / "curriculum"


@flow(name="rebuild-test")
def _start_stages(cfg, run_id: str, url: str) -> None:
    from tasks.stage_drivers import make_stage_driver

    make_stage_driver(cfg, open_store(url).run(run_id)).start()


@pytest.mark.parametrize("damage", ["deleted", "cut in half", "no applied key"])
def test_the_newest_curriculum_lost_is_rebuilt_on_start(advanced, damage):
    cfg, run, base = advanced
    lost = {n: run.load_curriculum(n)[1] for n in (2, 3)}
    # the state v3 must have: v0's sampler updated with every group of the scored shards, in
    # the applied order (the formula of the curriculum stage, written out)
    expected = NoPositiveResampling.from_state_dict(run.load_curriculum(0)[1]["sampler"])
    for key in KEYS:
        groups: dict = {}
        for row in run.read_shard("scored", key).to_pylist():
            groups.setdefault(row["group_id"], (row["prompt_id"], []))[1].append(row["passed"])
        for prompt_id, passes in groups.values():
            expected.update(prompt_id, passes)
    assert lost[3] == {"sampler": expected.state_dict(), "applied": KEYS}

    newest = base / "v3.json"
    if damage == "deleted":
        newest.unlink()
        (base / "v2.json").unlink()  # two versions gone: both rebuilt
    elif damage == "cut in half":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        newest.write_text('{"version": 3, "state": {"sampler": {}}}')
    run.write_status({"state": "finished"})  # verify checks every scored shard is applied
    before = verify_run(run).problems
    assert any("curriculum" in p for p in before), before

    _start_stages(cfg, RUN, str(base.parent.parent))
    assert run.list_curriculum_versions() == [0, 1, 2, 3]
    assert run.load_curriculum() == (3, lost[3])
    assert run.load_curriculum(2) == (2, lost[2])
    assert verify_run(run).problems == []
