"""Round trips of every artifact through the run store, on local disk, memory:// and S3."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import PROMPT_SCHEMA, SCHEMA_VERSION, ShardInfo, open_store
from storage.errors import NotCommittedError, RunNotFoundError, ShardNotFoundError


def _store(backend):
    url, options = backend
    return open_store(url, storage_options=options)


def test_runs_are_created_and_listed(backend):
    store = _store(backend)
    store.check()
    with pytest.raises(RunNotFoundError, match="Fix: "):
        store.run("r1")
    run = store.run("r1", create=True)
    store.run("r0", create=True)
    assert run.run_id == "r1" and run.url.endswith("/runs/r1")
    assert store.list_runs() == ["r0", "r1"]
    assert store.run("r1").run_id == "r1"


def test_config_round_trip(backend):
    run = _store(backend).run("r1", create=True)
    config = {"model": "tiny", "lr": 1e-6, "k": 8, "tasks": ["arith"], "nested": {"a": None}}
    run.write_config(config)
    run.write_config(dict(config))  # identical rewrite: no-op
    assert run.read_config() == config


def test_prompts_round_trip(backend):
    run = _store(backend).run("r1", create=True)
    table = pa.table(
        {
            "prompt_id": ["a", "b"],
            "prompt": ["1+1", "2+2"],
            "answer": ["2", None],
            "task": ["x"] * 2,
        },
    )
    run.write_prompts("train", table)
    run.write_prompts("train", table)  # identical: no-op
    back = run.read_prompts("train")
    assert back.to_pylist() == table.to_pylist()
    assert back.schema.names[:4] == PROMPT_SCHEMA.names
    with pytest.raises(NotCommittedError, match="write_prompts"):
        run.read_prompts("eval")


def test_shards_round_trip_in_commit_order(backend, make_rollouts):
    run = _store(backend).run("r1", create=True)
    tables = {key: make_rollouts("r1", key, seed=i) for i, key in enumerate(["b-2", "a-1", "c-3"])}
    infos = [run.commit_shard("raw", key, table) for key, table in tables.items()]
    assert all(isinstance(i, ShardInfo) for i in infos)
    listed = run.list_shards("raw")
    assert [i.key for i in listed] == ["b-2", "a-1", "c-3"]  # commit order, not name order
    assert listed == infos
    assert [i.committed_at for i in listed] == sorted(i.committed_at for i in listed)
    for key, table in tables.items():
        assert run.has_shard("raw", key)
        back = run.read_shard("raw", key)
        assert back.to_pylist() == table.to_pylist()
        meta = back.schema.metadata
        assert meta[b"scalerl.schema_version"] == str(SCHEMA_VERSION).encode()
        assert meta[b"scalerl.run_id"] == b"r1"
    assert listed[0].rows == tables["b-2"].num_rows and listed[0].bytes > 0
    assert not run.has_shard("raw", "zzz") and run.list_shards("scored") == []
    with pytest.raises(ShardNotFoundError, match="Fix: "):
        run.read_shard("raw", "zzz")
    assert run.stages() == ["raw"]


def test_shard_urls_are_readable_by_plain_pyarrow(backend, make_rollouts):
    url, options = backend
    run = _store(backend).run("r1", create=True)
    run.commit_shard("raw", "k1", make_rollouts("r1", "k1", n=4))
    run.commit_shard("raw", "k2", make_rollouts("r1", "k2", n=5, seed=3))
    urls = run.shard_urls("raw")
    assert [u.rsplit("/", 1)[1].split(".")[0] for u in urls] == ["k1", "k2"]
    import fsspec

    fs, _ = fsspec.url_to_fs(urls[0], **(options or {}))
    total = sum(pq.read_table(u, filesystem=fs).num_rows for u in urls)
    assert total == 9


def _write_files(path, files: dict[str, bytes]):
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)


def test_weights_round_trip(backend, tmp_path):
    run = _store(backend).run("r1", create=True)
    assert run.latest_weights_version() is None and run.list_weight_versions() == []
    v0 = {"model.safetensors": b"\x00" * 3000, "config.json": b"{}", "tok/tokenizer.json": b"t"}
    v1 = {"model.safetensors": b"\x01" * 3000, "config.json": b'{"v": 1}'}
    _write_files(tmp_path / "w0", v0)
    _write_files(tmp_path / "w1", v1)
    run.publish_weights(0, tmp_path / "w0")
    run.publish_weights(1, tmp_path / "w1")
    run.publish_weights(0, tmp_path / "w0")  # identical republish of an old version: no-op
    assert run.latest_weights_version() == 1
    assert run.list_weight_versions() == [0, 1]
    assert run.weights_url(1).endswith("/runs/r1/weights/v1")
    for version, files in ((0, v0), (1, v1)):
        out = run.download_weights(version, tmp_path / f"d{version}")
        got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert got == files
    with pytest.raises(NotCommittedError, match=r"pick one of \[0, 1\]"):
        run.download_weights(7, tmp_path / "d7")


def test_checkpoints_round_trip(backend, tmp_path):
    run = _store(backend).run("r1", create=True)
    assert run.latest_checkpoint_step() is None
    for step in (10, 20):
        _write_files(tmp_path / f"c{step}", {"state.pt": bytes([step]) * 100, "ledger.json": b"[]"})
        run.save_checkpoint(step, tmp_path / f"c{step}")
    assert run.list_checkpoints() == [10, 20] and run.latest_checkpoint_step() == 20
    out = run.load_checkpoint(10, tmp_path / "restore")
    assert (out / "state.pt").read_bytes() == bytes([10]) * 100


def test_metrics_appends_read_back_as_one_table(backend):
    run = _store(backend).run("r1", create=True)
    assert run.read_metrics("train").num_rows == 0
    run.append_metrics("train", [{"step": 0, "loss": 1.5}, {"step": 1, "loss": 1.25}])
    run.append_metrics("train", pa.table({"step": [2], "loss": [1.0]}))
    run.append_metrics("train", [{"step": 3, "loss": 0.5, "pass_rate": 0.25}])  # new column
    table = run.read_metrics("train")
    assert table.column("step").to_pylist() == [0, 1, 2, 3]
    assert table.column("loss").to_pylist() == [1.5, 1.25, 1.0, 0.5]
    assert table.column("pass_rate").to_pylist() == [None, None, None, 0.25]
    assert run.read_metrics("eval").num_rows == 0
    run.append_metrics("eval", [{"step": 0}, {"step": 1, "pass_rate": 0.5}])  # keys of all rows
    assert run.read_metrics("eval").to_pylist() == [
        {"step": 0, "pass_rate": None},
        {"step": 1, "pass_rate": 0.5},
    ]


def test_curriculum_latest_version_wins(backend):
    run = _store(backend).run("r1", create=True)
    assert run.load_curriculum() is None
    v0, v1 = {"sampler": {"retired": []}, "applied": []}, {"sampler": {}, "applied": ["k1"]}
    v2 = {"sampler": {"retired": ["p1"], "pass_rate": {"p2": 0.5}}, "applied": ["k1", "k2"]}
    run.save_curriculum(v0, 0)
    run.save_curriculum(v2, 2)
    run.save_curriculum(v1, 1)
    run.save_curriculum(v0, 0)  # identical: no-op
    assert run.load_curriculum() == (2, v2)


@pytest.mark.integration
def test_s3_endpoint_and_credentials_from_aws_environment(s3_options, monkeypatch, make_rollouts):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_options["client_kwargs"]["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = open_store("s3://scalerl-test/from-env")
    store.check()
    run = store.run("r1", create=True)
    run.commit_shard("raw", "k", make_rollouts("r1", "k"))
    assert [
        i.key for i in open_store("s3://scalerl-test/from-env").run("r1").list_shards("raw")
    ] == ["k"]


def test_status_is_replaced_atomically(tmp_path):
    from storage import open_store

    run = open_store(str(tmp_path)).run("r-status", create=True)
    assert run.read_status() is None
    run.write_status({"state": "running", "step": 1})
    run.write_status({"state": "finished", "step": 3, "reason": "max_steps"})
    assert run.read_status() == {"state": "finished", "step": 3, "reason": "max_steps"}
    assert open_store(str(tmp_path)).run("r-status").read_status()["state"] == "finished"


def test_markers_and_shard_counts(tmp_path):
    from storage import open_store, rollouts_from_records

    run = open_store(str(tmp_path)).run("r-markers", create=True)
    assert run.read_marker("trainer-intake") is None
    run.write_marker("trainer-intake", {"filtered_read": 3})
    run.write_marker("trainer-intake", {"filtered_read": 4})
    assert run.read_marker("trainer-intake") == {"filtered_read": 4}
    assert run.count_shards("raw") == 0
    record = {
        "run_id": "r-markers",
        "shard_id": "s",
        "prompt_id": "p",
        "group_id": "g",
        "sample_index": 0,
        "task": "arithmetic",
        "prompt": "1+1=",
        "prompt_token_ids": [1],
        "completion": "2",
        "completion_token_ids": [2],
        "logprobs": [-0.1],
        "versions": [0],
        "finish_reason": "stop",
        "thinking_tokens": 0,
        "answer_tokens": 1,
        "generator_id": "gen0",
        "started_at": 0.0,
        "finished_at": 1.0,
    }
    for key in ("a", "b"):
        run.commit_shard("raw", key, rollouts_from_records([record]))
    assert run.count_shards("raw") == 2 == len(run.list_shards("raw"))
