"""A corrupt raw shard in a real tiny run (under a temporary Prefect server): the score stage
quarantines it with the reason, the run report and a table artifact list it, the run completes,
and the run verifies clean.

The shard is committed by a real generator task, then damaged on disk (bytes flipped in the
middle of its Parquet file, as a bad disk or a partial overwrite would) before the run flow
starts and its score stage reads it."""

import asyncio

import pytest

from scalerl.config import load_config
from storage import open_store
from tasks.verify import verify_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RUN_ID = "quarantine-me"
BAD = "gen0-000000"


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

    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={root}",
            "schedule.max_steps=3",
            "evaluation.every_steps=100",
            "data.num_eval_prompts=8",
        ],
    )
    prepare_run(cfg, RUN_ID)
    assert generate_rollouts(cfg, RUN_ID, "gen0", max_shards=1)["shards"] == 1
    run = open_store(str(root)).run(RUN_ID)
    (info,) = run.list_shards("raw")
    assert info.key == BAD
    _flip_bytes(info.url)
    summary = scalerl_run(cfg, run_id=RUN_ID)
    return run, info, summary


def test_the_corrupt_shard_is_quarantined_with_its_reason_and_the_run_completes(corrupted_run):
    run, info, summary = corrupted_run
    assert summary["step"] == 3 and summary["reason"] == "max_steps"
    assert run.read_status()["state"] == "finished"
    assert run.list_weight_versions() == [0, 1, 2, 3]
    (doc,) = run.list_quarantined()
    assert (doc["stage"], doc["key"], doc["by"]) == ("raw", BAD, "score-shard")
    assert doc["error"] == "CorruptShardError" and "checksum does not match" in doc["reason"]
    assert doc["original_data"] == info.url
    raw = [s.key for s in run.list_shards("raw")]
    assert BAD not in raw and raw, "the run went on with other shards"
    # the restarted generator numbered past the quarantined key instead of reusing it
    assert all(k.startswith("gen0-") and k > BAD for k in raw)
    for stage in ("scored", "filtered"):
        assert not run.has_shard(stage, BAD)
    report = verify_run(run)
    assert report.ok, report.problems
    assert report.facts["quarantined_shards"] == 1 and report.facts["quarantine_pending"] == 0
    assert report.facts["raw_shards"] == report.facts["filtered_shards"] == len(raw)
    assert len(report.notes) == 1 and f"raw/{BAD}" in report.notes[0]


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
    assert "1 shard(s) could not be used" in section
    assert f"| raw | {BAD} | CorruptShardError | score-shard |" in section
    table = asyncio.run(read(artifact_key(RUN_ID, "quarantine")))
    assert table and BAD in table[-1].data and "CorruptShardError" in table[-1].data
    metrics = asyncio.run(read(artifact_key(RUN_ID, "metrics")))
    assert "1 shard(s) quarantined" in metrics[-1].description
