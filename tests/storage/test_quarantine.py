"""Run.quarantine_shard: a shard taken out of use is moved (data + commit record) to
quarantine/{stage}/{key}/{attempt}/ with a reason record, on local disk, memory:// and a real
S3-protocol server; it is idempotent, and a crash between any two of its steps leaves the
shard either still committed or quarantined with its reason, never lost."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import fsio, open_store
from storage.errors import CorruptShardError, ShardNotFoundError


def _fs(backend, url):
    options = backend[1] or {}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def _store_files(backend, run, sub):
    fs, path = _fs(backend, f"{run.url}/{sub}")
    return sorted(p[len(path) :] for p in fs.find(path))


def _flip_bytes(backend, url):
    fs, path = _fs(backend, url)
    data = bytearray(fs.cat_file(path))
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    fs.pipe_file(path, bytes(data))
    return bytes(data)


@pytest.fixture
def run_with_shards(backend, make_rollouts):
    url, options = backend
    run = open_store(url, storage_options=options).run("r1", create=True)
    tables = {key: make_rollouts("r1", key, n=6, seed=i) for i, key in enumerate(("k1", "k2"))}
    for key, table in tables.items():
        run.commit_shard("raw", key, table)
    return run, tables


def test_corrupt_shard_is_moved_with_its_reason(backend, run_with_shards):
    run, tables = run_with_shards
    info = {s.key: s for s in run.list_shards("raw")}["k1"]
    record_url = f"{run.url}/shards/raw/commits/k1.json"
    fs, record_path = _fs(backend, record_url)
    record = fs.cat_file(record_path)
    corrupt = _flip_bytes(backend, info.url)
    with pytest.raises(CorruptShardError) as err:
        run.read_shard("raw", "k1")

    doc = run.quarantine_shard("raw", "k1", err.value, by="test")

    assert [s.key for s in run.list_shards("raw")] == ["k2"]
    assert not run.has_shard("raw", "k1") and run.count_shards("raw") == 1
    assert run.read_shard("raw", "k2").num_rows == tables["k2"].num_rows
    assert doc["stage"] == "raw" and doc["key"] == "k1" and doc["by"] == "test"
    assert doc["error"] == "CorruptShardError" and "checksum does not match" in doc["reason"]
    assert doc["original_data"] == info.url and doc["original_record"] == record_url
    # the copies hold exactly what was committed (the corrupt bytes, for a person to examine)
    assert _fs(backend, doc["data_copy"])[0].cat_file(_fs(backend, doc["data_copy"])[1]) == corrupt
    assert _fs(backend, doc["record_copy"])[0].cat_file(_fs(backend, doc["record_copy"])[1]) == (
        record
    )
    attempt = json.loads(record)["data"].split(".")[-2]
    assert _store_files(backend, run, "quarantine") == [
        f"/raw/k1/{attempt}/commit.json",
        f"/raw/k1/{attempt}/k1.{attempt}.parquet",
        f"/raw/k1/{attempt}/reason.json",
    ]
    assert not fs.exists(_fs(backend, info.url)[1])  # the original went only after its copy
    assert run.list_quarantined() == [doc] == run.list_quarantined("raw")
    assert run.list_quarantined("scored") == []
    assert run.quarantined_keys("raw") == {"k1"}
    assert run.used_shard_keys("raw") == {"k1", "k2"}
    assert run.clean_orphans(older_than_s=0) == []  # nothing of the quarantine is an orphan


def test_a_healthy_shard_can_be_quarantined_and_its_copy_reads_back(backend, run_with_shards):
    run, tables = run_with_shards
    doc = run.quarantine_shard("raw", "k2", "withdrawn by an operator")
    assert doc["error"] == "" and doc["reason"] == "withdrawn by an operator"
    fs, path = _fs(backend, doc["data_copy"])
    copy = pq.read_table(pa.BufferReader(fs.cat_file(path)))
    assert copy.replace_schema_metadata(None).equals(tables["k2"].replace_schema_metadata(None))


def test_quarantine_is_idempotent(backend, run_with_shards):
    run, _ = run_with_shards
    first = run.quarantine_shard("raw", "k1", "first reason")
    again = run.quarantine_shard("raw", "k1", "a later, different reason")
    assert again == first  # the first reason is kept, nothing is copied twice
    assert len(run.list_quarantined()) == 1
    assert len(_store_files(backend, run, "quarantine")) == 3


def test_unknown_key_is_a_clear_error(run_with_shards):
    run, _ = run_with_shards
    with pytest.raises(ShardNotFoundError, match="neither committed nor quarantined"):
        run.quarantine_shard("raw", "nope", "x")


def test_a_new_commit_under_a_quarantined_key_gets_its_own_place(run_with_shards, make_rollouts):
    run, _ = run_with_shards
    run.quarantine_shard("raw", "k1", "first")
    run.commit_shard("raw", "k1", make_rollouts("r1", "k1", n=4, seed=9))
    run.quarantine_shard("raw", "k1", "second")
    docs = run.list_quarantined("raw")
    assert [d["reason"] for d in docs] == ["first", "second"]
    assert docs[0]["data_copy"] != docs[1]["data_copy"]
    assert run.quarantined_keys("raw") == {"k1"} and not run.has_shard("raw", "k1")


class Crash(BaseException):
    """Stands for the process dying at a fault point: no handler in the store catches it."""


STEPS = ("quarantine.data_copied", "quarantine.reason_written", "quarantine.record_removed")


@pytest.mark.parametrize("point", STEPS)
def test_a_crash_between_steps_loses_nothing_and_a_repeat_finishes(
    backend, run_with_shards, monkeypatch, point
):
    run, tables = run_with_shards
    info = {s.key: s for s in run.list_shards("raw")}["k1"]
    original = run.read_shard("raw", "k1")

    def crash_at(name):
        if name == point:
            raise Crash(name)

    monkeypatch.setattr(fsio, "fault_point", crash_at)
    with pytest.raises(Crash):
        run.quarantine_shard("raw", "k1", "bad shard")
    monkeypatch.undo()

    committed = run.has_shard("raw", "k1")
    quarantined = run.list_quarantined("raw")
    assert committed or quarantined, "the shard is neither committed nor quarantined"
    if committed:  # still readable exactly as before
        assert run.read_shard("raw", "k1").equals(original)
    if point == "quarantine.data_copied":
        assert committed and not quarantined  # no reason yet: not quarantined
    else:
        assert [d["reason"] for d in quarantined] == ["bad shard"]
        assert committed == (point == "quarantine.reason_written")

    doc = run.quarantine_shard("raw", "k1", "repeat")
    assert doc["reason"] == ("repeat" if point == "quarantine.data_copied" else "bad shard")
    assert not run.has_shard("raw", "k1") and [s.key for s in run.list_shards("raw")] == ["k2"]
    fs, path = _fs(backend, doc["data_copy"])
    copy = pq.read_table(pa.BufferReader(fs.cat_file(path)))
    assert copy.replace_schema_metadata(None).equals(tables["k1"].replace_schema_metadata(None))
    assert not fs.exists(_fs(backend, info.url)[1])
    assert len(run.list_quarantined()) == 1


def test_a_shard_whose_data_file_is_missing_is_quarantined_by_its_record(backend, run_with_shards):
    run, _ = run_with_shards
    info = {s.key: s for s in run.list_shards("raw")}["k1"]
    fs, path = _fs(backend, info.url)
    fs.rm_file(path)
    with pytest.raises(CorruptShardError, match="is missing") as err:
        run.read_shard("raw", "k1")
    doc = run.quarantine_shard("raw", "k1", err.value)
    assert doc["data_copy"] is None and doc["original_data"] == info.url
    assert not run.has_shard("raw", "k1") and run.quarantine_problems() == []
    rfs, rpath = _fs(backend, doc["record_copy"])
    assert json.loads(rfs.cat_file(rpath))["key"] == "k1"


def test_a_lost_quarantine_copy_is_reported(backend, run_with_shards):
    run, _ = run_with_shards
    doc = run.quarantine_shard("raw", "k1", "bad")
    assert run.quarantine_problems() == []
    fs, path = _fs(backend, doc["data_copy"])
    fs.rm_file(path)
    (problem,) = run.quarantine_problems()
    assert problem.startswith("quarantined raw/k1 lacks its copy of k1.") and "parquet" in problem
