"""The run flow under a real (temporary) Prefect server: a 3-step tiny run end to end."""

import asyncio
import json

import pytest

from runtime.common import with_run_id
from scalerl.config import load_config
from storage import open_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, prefect_harness):
    from flows.run import scalerl_run

    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={root}",
            "schedule.max_steps=3",
            "evaluation.every_steps=2",
            "data.num_eval_prompts=16",
        ],
    )
    state = scalerl_run(cfg, return_state=True)
    summary = state.result()
    summary["flow_run_id"] = state.state_details.flow_run_id
    return cfg, root, summary


def test_three_steps_leave_every_stage_weights_metrics_and_curriculum(tiny_run):
    cfg, root, summary = tiny_run
    assert summary["step"] == 3 and summary["reason"] == "max_steps"
    run = open_store(str(root)).run(summary["run_id"])
    for stage in ("raw", "scored", "filtered", "eval"):
        assert run.list_shards(stage), f"no committed {stage} shard"
    scored = run.read_shard("scored", run.list_shards("scored")[0].key)
    assert scored.column("reward").null_count == 0
    assert (
        "filter_reason"
        in run.read_shard("filtered", run.list_shards("filtered")[0].key).column_names
    )
    assert run.list_weight_versions() == [0, 1, 2, 3]  # continuous
    trainer = run.read_metrics("trainer")
    assert trainer.num_rows == 3
    evals = run.read_metrics("eval").to_pylist()
    assert {r["step"] for r in evals} >= {0, 2, 3}
    version, state = run.load_curriculum()
    assert version == len(state["applied"]) and version >= 1
    assert run.read_status()["state"] == "finished"
    assert json.loads(json.dumps(run.read_config()))["schedule"]["max_steps"] == 3
    assert set(summary["plots"]) == {"curve", "lengths", "staleness"}


def test_plots_are_valid_pngs_of_the_documented_size(tiny_run):
    from PIL import Image

    from scalerl.plots import PIXELS

    _, root, summary = tiny_run
    for name in ("curve", "lengths", "staleness"):
        path = root / summary["run_id"] / "plots" / f"{name}.png"
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == tuple(PIXELS)


def test_artifacts_are_in_the_prefect_api(tiny_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.report import artifact_key

    _, _, summary = tiny_run

    async def read(key):
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )

    rid = summary["run_id"]
    progress = asyncio.run(read(artifact_key(rid, "progress")))
    assert progress and progress[-1].data == 100.0
    table = asyncio.run(read(artifact_key(rid, "metrics")))
    assert table and "loss" in table[-1].data
    report = asyncio.run(read(artifact_key(rid, "report")))
    assert report and f"ScaleRL run `{rid}`" in report[-1].data


async def _task_run_names(prefix: str, flow_run_id=None) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    flows = None if flow_run_id is None else FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=flows,
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=prefix)),
            limit=200,
        )
    return [r.name for r in runs]


def test_tiny_cpu_moves_every_shard_through_its_stages_in_one_stream_task_run(tiny_run):
    """pipeline.stage_tasks = stream (the tiny-cpu preset): one advance-stream task run for the
    whole run and none per shard, and every stage's output committed as with three task runs."""
    cfg, root, summary = tiny_run
    assert cfg.pipeline.stage_tasks == "stream"
    run = open_store(str(root)).run(summary["run_id"])
    raw = {s.key for s in run.list_shards("raw")}
    assert {s.key for s in run.list_shards("scored")} == raw
    assert {s.key for s in run.list_shards("filtered")} == raw
    version, state = run.load_curriculum()
    assert sorted(state["applied"]) == sorted(raw) and version == len(raw)
    flow_run = summary["flow_run_id"]
    assert len(asyncio.run(_task_run_names("advance-stream", flow_run))) == 1
    for name in ("advance-shard", "score-shard", "update-curriculum", "filter-shard"):
        assert not asyncio.run(_task_run_names(name, flow_run)), name


def test_invalid_parameters_are_rejected_before_anything_is_written(tmp_path, prefect_harness):
    from flows.run import scalerl_run

    root = tmp_path / "runs"
    bad = {"storage": {"url": str(root)}, "pipeline": {"max_off_policy_steps": -1}}
    with pytest.raises(Exception, match="max_off_policy_steps"):
        scalerl_run(config=bad)
    assert not root.exists()


def test_flows_on_an_existing_run_evaluate_fit_and_add_a_generator(tiny_run):
    from flows.evaluate import scalerl_evaluate
    from flows.fit_curve import scalerl_fit_curve
    from flows.generate import scalerl_generate

    _, root, summary = tiny_run
    rid = summary["run_id"]
    row = scalerl_evaluate(str(root), rid, version=1)
    assert row["version"] == 1 and 0.0 <= row["pass_rate"] <= 1.0
    run = open_store(str(root)).run(rid)
    assert run.has_shard("eval", "v000001")
    assert scalerl_fit_curve(str(root), rid) is None  # 3 steps: too few points, said plainly
    run.write_status({"state": "running", "reason": "test: accept another generator"})
    # A live trainer would have read every filtered shard; without one, backpressure would
    # (rightly) hold the new generator back.
    run.write_marker(
        "trainer-intake", {"stage": "filtered", "shards_read": run.count_shards("raw")}
    )
    out = scalerl_generate(str(root), rid, "extra", max_shards=1)
    assert out["shards"] == 1
    assert run.has_shard("raw", "extra-000000")
    run.write_status({"state": "finished", "reason": "test"})


@pytest.mark.timeout(600)
def test_a_run_deleted_and_started_again_under_the_same_id_runs_its_stages(
    tmp_path, prefect_harness
):
    """Stage outputs are checked in the store, not remembered by Prefect: a run removed and
    started again at the same URL with the same id scores and filters its new shards (a Prefect
    result cache keyed by (stage, URL, run id, shard) once made such a flow loop forever)."""
    import shutil

    from flows.run import scalerl_run

    root = tmp_path / "runs"
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={root}",
            "schedule.max_steps=1",
            "evaluation.every_steps=100",
            "data.num_eval_prompts=8",
        ],
    )
    before = len(asyncio.run(_task_run_names("filter-shard")))
    before_shard = len(asyncio.run(_task_run_names("advance-shard")))
    # three task runs per shard as in the paper preset, then one per shard
    for tasks in ("per_stage", "per_shard"):
        shutil.rmtree(root, ignore_errors=True)
        summary = scalerl_run(
            with_run_id(
                cfg.model_copy(
                    update={"pipeline": cfg.pipeline.model_copy(update={"stage_tasks": tasks})}
                ),
                "same-id",
            )
        )
        assert summary["step"] == 1
        run = open_store(str(root)).run("same-id")
        assert {s.key for s in run.list_shards("filtered")} == {
            s.key for s in run.list_shards("raw")
        }
    # one filter-shard task run per raw shard of the per_stage run, one advance-shard task run
    # per raw shard of the per_shard run
    assert len(asyncio.run(_task_run_names("filter-shard"))) - before >= 1
    assert len(asyncio.run(_task_run_names("advance-shard"))) - before_shard >= 1
