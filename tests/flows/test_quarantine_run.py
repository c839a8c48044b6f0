"""Corrupt shards in a real tiny run (under a temporary Prefect server): a raw shard the score
stage reads and a filtered shard the trainer reads are both quarantined with their reasons, the
run report and a table artifact list them, the run completes, and the run verifies clean.

Two shards are committed by a real generator task; the second goes through the real score,
curriculum and filter tasks. Then the raw file of the first and the filtered file of the second
are damaged on disk (bytes flipped in the middle of the Parquet file, as a bad disk or a partial
overwrite would) before the run flow starts and its stages and trainer read them."""

import asyncio

import pytest

from runtime.verify import verify_run
from scalerl.config import load_config
from storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RUN_ID = "quarantine-me"
BAD = "gen0-000000"  # raw file corrupted: found by the score stage
BAD_FILTERED = "gen0-000001"  # filtered file corrupted: found by the trainer


def _flip_bytes(path: str) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        mid = len(data) // 2
        data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
        f.seek(0)
        f.write(data)


@pytest.fixture(scope="module")
def corrupted_run(tmp_path_factory, prefect_harness):
    from flows.run import scalerl_run
    from tasks.prepare import prepare_run
    from tasks.rollouts import generate_rollouts
    from tasks.stages import filter_shard, score_shard, update_curriculum

    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={root}",
            f"storage.run_id={RUN_ID}",
            "schedule.max_steps=3",
            "evaluation.every_steps=100",
            "data.num_eval_prompts=8",
        ],
    )
    prepare_run(cfg, RUN_ID)
    assert generate_rollouts(cfg, RUN_ID, "gen0", max_shards=2)["shards"] == 2
    for stage in (score_shard, update_curriculum, filter_shard):
        stage(cfg, RUN_ID, BAD_FILTERED)
    run = open_store(str(root)).run(RUN_ID)
    assert [s.key for s in run.list_shards("raw")] == [BAD, BAD_FILTERED]
    (info,) = [s for s in run.list_shards("raw") if s.key == BAD]
    (filtered,) = run.list_shards("filtered")
    _flip_bytes(info.url)
    _flip_bytes(filtered.url)
    summary = scalerl_run(cfg)
    return run, info, summary


def test_the_corrupt_shard_is_quarantined_with_its_reason_and_the_run_completes(corrupted_run):
    run, info, summary = corrupted_run
    assert summary["step"] == 3 and summary["reason"] == "max_steps"
    assert run.read_status()["state"] == "finished"
    assert run.list_weight_versions() == [0, 1, 2, 3]
    docs = {(d["stage"], d["key"]): d for d in run.list_quarantined()}
    assert set(docs) == {("raw", BAD), ("filtered", BAD_FILTERED)}
    raw_doc, filtered_doc = docs["raw", BAD], docs["filtered", BAD_FILTERED]
    assert raw_doc["by"] == "score-shard" and filtered_doc["by"] == "trainer"
    for doc in (raw_doc, filtered_doc):
        assert doc["error"] == "CorruptShardError" and "checksum does not match" in doc["reason"]
    assert raw_doc["original_data"] == info.url
    raw = [s.key for s in run.list_shards("raw")]
    assert BAD not in raw and BAD_FILTERED in raw and len(raw) > 1, "the run went on"
    # the generator, started again by the flow, numbered past both keys instead of reusing one
    assert all(k.startswith("gen0-") and k > BAD for k in raw)
    for stage in ("scored", "filtered"):
        assert not run.has_shard(stage, BAD)
    assert not run.has_shard("filtered", BAD_FILTERED)
    # the trainer read it, rejected it and trained on none of its groups
    metrics = run.read_metrics("trainer").to_pylist()
    assert sum(m["shards_rejected"] for m in metrics) == 1
    report = verify_run(run)
    assert report.ok, report.problems
    assert report.facts["quarantined_shards"] == 2 and report.facts["quarantine_pending"] == 0
    assert report.facts["raw_shards"] == report.facts["filtered_shards"] + 1 == len(raw)
    assert len(report.notes) == 2 and any(
        f"filtered/{BAD_FILTERED} by trainer" in n for n in report.notes
    )


def test_the_ui_artifacts_list_the_quarantined_shard(corrupted_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.report import artifact_key

    async def read(key):
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )

    report = asyncio.run(read(artifact_key(RUN_ID, "report")))
    text = report[-1].data
    section = text[text.index("## Quarantined shards") :]
    assert "2 shard(s) could not be used" in section
    assert f"| raw | {BAD} | CorruptShardError | score-shard |" in section
    assert f"| filtered | {BAD_FILTERED} | CorruptShardError | trainer |" in section
    table = asyncio.run(read(artifact_key(RUN_ID, "quarantine")))
    assert table and BAD in table[-1].data and BAD_FILTERED in table[-1].data
    metrics = asyncio.run(read(artifact_key(RUN_ID, "metrics")))
    assert "2 shard(s) quarantined" in metrics[-1].description
