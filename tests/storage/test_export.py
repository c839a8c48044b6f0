"""storage/export.py: parquet, jsonl and Hugging Face exports of committed shards, all or nothing."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import open_store
from storage.errors import InvalidInputError
from storage.export import export_run


@pytest.fixture
def run(backend, make_rollouts):
    url, options = backend
    run = open_store(url, storage_options=options).run("x1", create=True)
    for seed, key in enumerate(["gen0-000001", "gen0-000002"]):
        run.commit_shard("raw", key, make_rollouts("x1", key, n=6, seed=seed))
    table = make_rollouts("x1", "gen0-000001", n=4, seed=7)
    logprobs = table.column("logprobs").to_pylist()
    logprobs[0][0] = -math.inf  # a real generator can emit this; JSON cannot hold it
    table = table.set_column(
        table.schema.get_field_index("logprobs"),
        "logprobs",
        pa.array(logprobs, pa.list_(pa.float32())),
    )
    run.commit_shard("eval-v2", "v000001", table)
    return run


@pytest.fixture
def out_root(tmp_path):
    """Where exports go; the local backend keeps its store in tmp_path / 'runs'."""
    path = tmp_path / "exports"
    path.mkdir()
    return path


def _rows(run, stage):
    tables = [run.read_shard(stage, s.key) for s in run.list_shards(stage)]
    return pa.concat_tables(tables).to_pylist()


def test_parquet_copies_each_committed_shard(run, out_root):
    result = export_run(run, out_root / "out", "parquet")
    assert result.rows == {"eval-v2": 4, "raw": 12} and result.shards == 3
    for stage in ("raw", "eval-v2"):
        for info in run.list_shards(stage):
            copy = pq.read_table(out_root / "out" / stage / f"{info.key}.parquet")
            assert copy.equals(run.read_shard(stage, info.key))
    manifest = json.loads((out_root / "out" / "export.json").read_text())
    assert manifest["run_id"] == "x1" and manifest["format"] == "parquet"
    assert manifest["stages"]["raw"] == {"rows": 12, "shards": ["gen0-000001", "gen0-000002"]}


def test_jsonl_one_object_per_completion(run, out_root):
    export_run(run, out_root / "out", "jsonl", stages=["raw", "eval-v2"])
    lines = (out_root / "out" / "raw.jsonl").read_text().splitlines()
    expected = _rows(run, "raw")
    assert len(lines) == len(expected)
    first = json.loads(lines[0])
    assert first["completion_token_ids"] == expected[0]["completion_token_ids"]
    assert first["started_at"] == expected[0]["started_at"].isoformat()
    evals = [
        json.loads(line) for line in (out_root / "out" / "eval-v2.jsonl").read_text().splitlines()
    ]
    assert evals[0]["logprobs"][0] is None  # -inf -> null: strict JSON
    assert evals[0]["logprobs"][1:] == pytest.approx(_rows(run, "eval-v2")[0]["logprobs"][1:])


def test_hf_dataset_dict_loads_back(run, out_root):
    import datasets

    export_run(run, out_root / "out", "hf")
    loaded = datasets.load_from_disk(str(out_root / "out"))
    assert set(loaded) == {"raw", "eval_v2"}  # '-' is not allowed in split names
    expected = _rows(run, "raw")
    assert loaded["raw"].num_rows == len(expected)
    assert loaded["raw"]["completion"] == [r["completion"] for r in expected]
    assert loaded["raw"].features["started_at"].dtype == "timestamp[ms, tz=UTC]"


def test_progress_is_reported_per_shard(run, out_root):
    seen = []
    export_run(
        run, out_root / "out", "parquet", stages=["raw"], progress=lambda d, t: seen.append((d, t))
    )
    assert seen == [(1, 2), (2, 2)]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "hf"])
def test_a_failure_midway_leaves_nothing(run, out_root, fmt):
    def boom(done, total):
        if done == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle

    target = out_root / "deep" / "er" / "out"
    with pytest.raises(KeyboardInterrupt):
        export_run(run, target, fmt, progress=boom)
    assert list(out_root.iterdir()) == []


def test_bad_requests_name_the_fix(run, out_root):
    with pytest.raises(InvalidInputError, match="unknown. Fix"):
        export_run(run, out_root / "a", "csv")
    with pytest.raises(InvalidInputError, match=r"stage 'scored' .* no committed shards. Fix"):
        export_run(run, out_root / "a", "parquet", stages=["scored"])
    (out_root / "full").mkdir()
    (out_root / "full" / "x").write_text("keep")
    with pytest.raises(InvalidInputError, match="not an empty directory"):
        export_run(run, out_root / "full", "jsonl")
    assert sorted(p.name for p in out_root.iterdir()) == ["full"]
    (out_root / "empty").mkdir()
    export_run(run, out_root / "empty", "jsonl", stages=["raw"])  # an empty directory is fine
    assert sorted(p.name for p in (out_root / "empty").iterdir()) == ["export.json", "raw.jsonl"]


def test_a_run_without_shards(backend, out_root):
    url, options = backend
    run = open_store(url, storage_options=options).run("empty", create=True)
    with pytest.raises(InvalidInputError, match="no committed shards yet"):
        export_run(run, out_root / "a", "parquet")
    assert list(out_root.iterdir()) == []
