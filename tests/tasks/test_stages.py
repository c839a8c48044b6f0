"""The stages outside a run flow: advance_shard (per_shard) and advance_stream (stream) over raw
shards committed by a real generator task, under the session's temporary Prefect server.

advance_shard hands the scored table it just committed to the curriculum and filter stages
instead of reading it back; what they commit must equal what they commit from the stored shard.
advance_stream drains what is pending when told the run ends, and stops by itself when the run
has failed."""

import pytest

from scalerl.config import load_config
from scalerl.filtering import filter_reasons
from storage import open_store

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory, prefect_harness):
    from tasks.prepare import prepare_run
    from tasks.rollouts import generate_rollouts

    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={root}",
            "data.num_eval_prompts=8",
            "schedule.max_steps=2",
            # no trainer reads these shards: the preset's queue bound (2) would hold the third
            "pipeline.max_queued_batches=null",
        ],
    )
    run_id = "stages"
    prepare_run(cfg, run_id)
    assert generate_rollouts(cfg, run_id, "gen0", max_shards=3)["shards"] == 3
    return cfg, run_id, open_store(str(root)).run(run_id)


def test_advance_shard_commits_what_the_three_stages_commit_and_is_idempotent(raw_shards):
    from tasks.stages import advance_shard, pending_keys

    cfg, run_id, run = raw_shards
    key = pending_keys(run)[0]
    out = advance_shard(cfg, run_id, key)
    assert out["score"]["rows"] == cfg.completions_per_batch
    assert out["curriculum"]["version"] == 1
    # the filter stage got the scored table from memory: its output is what the stored
    # scored shard gives
    expected, _ = filter_reasons(
        run.read_shard("scored", key), zero_variance=cfg.algorithm.zero_variance_filter
    )
    assert run.read_shard("filtered", key).equals(expected)
    # so did the curriculum: one update per group of the shard, with the stored pass counts
    _, state = run.load_curriculum()
    assert state["applied"] == [key]
    again = advance_shard(cfg, run_id, key)
    assert all(again[s].get("skipped") for s in ("score", "curriculum", "filter"))
    assert run.load_curriculum()[0] == 1 and key not in pending_keys(run)


def test_advance_stream_drains_what_is_pending_once_told_the_run_ends(raw_shards):
    from tasks.stages import advance_stream, end_stream, open_stream, pending_keys

    cfg, run_id, run = raw_shards
    left = pending_keys(run)
    assert len(left) == 2, "the first test leaves two shards pending"
    run.write_status({"state": "running", "reason": "test"})
    open_stream(run_id)
    end_stream(run_id)  # told before it starts: one pass over what is pending, then return
    totals = advance_stream(cfg, run_id)
    assert totals["shards"] == len(left) and totals["quarantined"] == 0
    assert totals["rows"] == len(left) * cfg.completions_per_batch
    assert not pending_keys(run)
    raw = [s.key for s in run.list_shards("raw")]
    assert {s.key for s in run.list_shards("filtered")} == set(raw)
    version, state = run.load_curriculum()
    assert sorted(state["applied"]) == sorted(raw) and version == len(raw)
    # the stream kept the curriculum state in memory between its shards: what it committed
    # must be what folding every scored shard, in the applied order, into the v0 state gives
    from scalerl.curriculum import NoPositiveResampling

    expected = NoPositiveResampling.from_state_dict(run.load_curriculum(0)[1]["sampler"])
    for key in state["applied"]:
        groups: dict = {}
        for row in run.read_shard("scored", key).to_pylist():
            groups.setdefault(row["group_id"], (row["prompt_id"], []))[1].append(row["passed"])
        for prompt_id, passes in groups.values():
            expected.update(prompt_id, passes)
    assert state["sampler"] == expected.state_dict()


def test_advance_stream_stops_by_itself_when_the_run_has_failed(raw_shards):
    from tasks.stages import advance_stream, open_stream

    cfg, run_id, run = raw_shards
    open_stream(run_id)  # never ended: only the failed status stops it
    run.write_status({"state": "failed", "reason": "test: a generator failed"})
    assert advance_stream(cfg, run_id)["stopped"] == "the run failed"
