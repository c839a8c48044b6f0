"""Commit protocol: idempotent re-commits, conflicts, and one clear error per bad input."""

from __future__ import annotations

import json
import zlib

import fsspec
import pyarrow as pa
import pytest

import storage.shards
from storage import open_store
from storage.errors import (
    CommitConflictError,
    CorruptShardError,
    ForeignFileError,
    InvalidRolloutsError,
    SchemaVersionError,
)


def _run(backend, run_id="r1"):
    url, options = backend
    return open_store(url, storage_options=options).run(run_id, create=True)


def _fs(backend):
    url, options = backend
    return fsspec.url_to_fs(url, **(options or {}))[0]


def _path(url: str) -> str:
    return url.split("://", 1)[-1] if url.startswith("s3://") else url.replace("memory://", "/")


def _put(fs, path: str, data: bytes) -> None:
    if "file" in fs.protocol:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def test_identical_recommit_is_a_no_op(backend, make_rollouts):
    run = _run(backend)
    table = make_rollouts("r1", "k")
    first = run.commit_shard("raw", "k", table)
    again = run.commit_shard("raw", "k", table)
    # Same rows, different chunking: other bytes would be written, but the content is equal.
    rechunked = pa.concat_tables([table.slice(0, 2), table.slice(2)])
    third = run.commit_shard("raw", "k", rechunked)
    assert first == again == third
    assert len(run.list_shards("raw")) == 1
    data_dir = first.url.rsplit("/", 1)[0]
    assert len(_fs(backend).ls(_path(data_dir))) == 1  # no second data file left behind


def test_different_content_conflicts_and_original_is_kept(backend, make_rollouts):
    run = _run(backend)
    original = make_rollouts("r1", "k", seed=1)
    info = run.commit_shard("raw", "k", original)
    with pytest.raises(CommitConflictError, match="raw/k .*already committed.*Fix: "):
        run.commit_shard("raw", "k", make_rollouts("r1", "k", seed=2))
    assert run.list_shards("raw") == [info]
    assert run.read_shard("raw", "k").to_pylist() == original.to_pylist()


def test_config_conflict(backend):
    run = _run(backend)
    run.write_config({"lr": 1, "data": {"seed": 0, "source": "a"}})
    # one line naming every differing field with both values, and the fix
    with pytest.raises(CommitConflictError) as err:
        run.write_config({"lr": 2, "data": {"seed": 0, "source": "b"}})
    assert isinstance(err.value, ValueError)  # bad input: prepare_run does not retry it
    message = str(err.value)
    assert "\n" not in message
    assert (
        'differing: data.source: "a" in run.json, "b" given; lr: 1 in run.json, 2 given.' in message
    )
    assert "Fix: resume it with its own config" in message
    assert run.read_config() == {"lr": 1, "data": {"seed": 0, "source": "a"}}
    run.write_config({"lr": 2}, overwrite=True)  # the whole snapshot replaced
    assert run.read_config() == {"lr": 2}


def test_a_resume_may_add_a_tracker_but_change_nothing_else(backend):
    run = _run(backend)
    run.write_config({"lr": 1, "tracking": {"mlflow": None}})
    run.check_config({"lr": 1, "tracking": {"tensorboard": {}}})  # trackers only: accepted
    run.write_config({"lr": 1, "tracking": {"tensorboard": {}}})
    assert run.read_config() == {"lr": 1, "tracking": {"tensorboard": {}}}  # what it mirrors to
    with pytest.raises(CommitConflictError, match=r"differing: lr: 1 in run.json, 2 given"):
        run.write_config({"lr": 2, "tracking": {"wandb": {"project": "p"}}})
    assert run.read_config() == {"lr": 1, "tracking": {"tensorboard": {}}}


def test_weights_and_curriculum_conflicts(backend, tmp_path):
    run = _run(backend)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.bin").write_bytes(b"a" * 10)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "m.bin").write_bytes(b"b" * 10)
    run.publish_weights(1, tmp_path / "a")
    with pytest.raises(CommitConflictError, match=r"v1 is already committed.*overwrite=True"):
        run.publish_weights(1, tmp_path / "b")
    assert (run.download_weights(1, tmp_path / "d") / "m.bin").read_bytes() == b"a" * 10
    run.publish_weights(1, tmp_path / "b", overwrite=True)
    assert (run.download_weights(1, tmp_path / "e") / "m.bin").read_bytes() == b"b" * 10
    run.save_curriculum({"sampler": {"x": 1}, "applied": []}, 3)
    with pytest.raises(CommitConflictError, match="version 3 .*Fix: save under version"):
        run.save_curriculum({"sampler": {"x": 2}, "applied": []}, 3)


def test_latest_weights_pointer_moves_forward_and_polls_read_only_it(backend, tmp_path):
    # Generators poll latest_weights_version between decode steps. The LATEST pointer makes a
    # poll two small reads; it was never written (publish asked latest_hint(), which listed the
    # manifest just committed and saw nothing to move), so every poll listed every version.
    run = _run(backend)
    (tmp_path / "w").mkdir()
    for v in (0, 1, 2):
        (tmp_path / "w" / "m.bin").write_bytes(bytes([v]) * 10)
        run.publish_weights(v, tmp_path / "w")
    fs = run._weights._loc.fs
    pointer = _path(run._weights._loc.url_of(run._weights._base + "/LATEST"))
    assert json.loads(fs.cat_file(pointer)) == {"weights": 2}
    run.publish_weights(1, tmp_path / "w", overwrite=True)  # a resumed trainer republishing v1
    assert json.loads(fs.cat_file(pointer)) == {"weights": 2}  # never moves back
    listings: list[str] = []
    original_ls = fs.ls

    def counting_ls(path, *args, **kwargs):
        listings.append(path)
        return original_ls(path, *args, **kwargs)

    fs.ls = counting_ls
    try:
        assert run.latest_weights_version() == 2
        assert listings == []
        fs.rm_file(pointer)  # a store written before the fix: the listing still answers
        assert run.latest_weights_version() == 2 and listings
    finally:
        del fs.ls
    _put(fs, pointer, b'{"weights": "two"}')
    with pytest.raises(ForeignFileError, match="not a pointer written by the run store"):
        run.latest_weights_version()


def test_a_retried_publish_moves_the_pointer_its_first_attempt_did_not(
    backend, tmp_path, monkeypatch
):
    # The manifest of v1 was written, then the pointer write failed (an outage, or the writer
    # was killed between the two). The retry finds v1 committed identically: it must still
    # move the pointer, or readers trust v0 while v1 is the newest version.
    import storage.dirs

    run = _run(backend)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "m.bin").write_bytes(b"0" * 10)
    run.publish_weights(0, tmp_path / "w")
    (tmp_path / "w" / "m.bin").write_bytes(b"1" * 10)
    real_write, failed = storage.dirs.fsio.write_atomic, []

    def failing_pointer_write(loc, path, data):
        if path.endswith("/LATEST") and not failed:
            failed.append(path)
            raise OSError("connection reset while writing the pointer")
        return real_write(loc, path, data)

    monkeypatch.setattr(storage.dirs.fsio, "write_atomic", failing_pointer_write)
    with pytest.raises(OSError, match="connection reset"):
        run.publish_weights(1, tmp_path / "w")
    assert failed and run.list_weight_versions() == [0, 1]  # committed, pointer still at 0
    run.publish_weights(1, tmp_path / "w")  # the retry: identical files, nothing uploaded...
    pointer = _path(run._weights._loc.url_of(run._weights._base + "/LATEST"))
    assert json.loads(_fs(backend).cat_file(pointer)) == {"weights": 1}  # ...but the pointer moved
    assert run.latest_weights_version() == 1


def test_rows_of_another_run_are_refused_at_commit(backend, make_rollouts):
    run = _run(backend)
    with pytest.raises(InvalidRolloutsError, match="rows of run 'other'.*Fix: set run_id"):
        run.commit_shard("raw", "k", make_rollouts("other", "k"))
    assert not run.has_shard("raw", "k")


def test_corrupt_shard_file(backend, make_rollouts):
    run = _run(backend)
    info = run.commit_shard("raw", "k", make_rollouts("r1", "k"))
    fs = _fs(backend)
    data = fs.cat_file(_path(info.url))
    fs.pipe_file(_path(info.url), data[: len(data) // 2])  # truncated
    with pytest.raises(CorruptShardError, match=r"is corrupt.*Fix: delete the commit record") as e:
        run.read_shard("raw", "k")
    assert info.url in str(e.value)
    fs.pipe_file(_path(info.url), b"\x00" * len(data))  # same size, garbage
    with pytest.raises(CorruptShardError, match="is corrupt"):
        run.read_shard("raw", "k")
    fs.rm_file(_path(info.url))
    with pytest.raises(CorruptShardError, match="is missing"):
        run.read_shard("raw", "k")


def test_corrupt_parquet_with_matching_record_is_reported(backend, make_rollouts):
    run = _run(backend)
    info = run.commit_shard("raw", "k", make_rollouts("r1", "k"))
    fs = _fs(backend)
    garbage = b"PAR1 not really parquet PAR1"
    fs.pipe_file(_path(info.url), garbage)
    record_path = _path(info.url).replace("/data/", "/commits/").rsplit(".", 2)[0] + ".json"
    record = json.loads(fs.cat_file(record_path))
    record.update(bytes=len(garbage), crc32=zlib.crc32(garbage))
    fs.pipe_file(record_path, json.dumps(record).encode())
    with pytest.raises(CorruptShardError, match="is not valid Parquet.*Fix: "):
        run.read_shard("raw", "k")


def test_schema_version_mismatch(backend, make_rollouts, monkeypatch):
    run = _run(backend)
    monkeypatch.setattr(storage.shards, "SCHEMA_VERSION", 2)
    run.commit_shard("raw", "k", make_rollouts("r1", "k"))
    monkeypatch.setattr(storage.shards, "SCHEMA_VERSION", 1)
    with pytest.raises(SchemaVersionError, match="schema version 2, expected 1. Fix: "):
        run.read_shard("raw", "k")


def test_shard_copied_from_another_run(backend, make_rollouts):
    url, options = backend
    store = open_store(url, storage_options=options)
    other, run = store.run("other", create=True), store.run("r1", create=True)
    info = other.commit_shard("raw", "k", make_rollouts("other", "k"))
    fs = _fs(backend)
    src = _path(info.url).rsplit("/shards/", 1)
    dst = _path(run.url) + "/shards/" + src[1]
    _put(fs, dst, fs.cat_file(_path(info.url)))
    record = src[0] + "/shards/raw/commits/k.json"
    _put(fs, _path(run.url) + "/shards/raw/commits/k.json", fs.cat_file(record))
    with pytest.raises(ForeignFileError, match="belongs to run 'other'.*move it out"):
        run.read_shard("raw", "k")
    with pytest.raises(ForeignFileError, match="belongs to run 'other'"):
        run.list_shards("raw")


@pytest.mark.parametrize(
    ("rel", "call"),
    [
        ("shards/raw/commits/notes.txt", lambda r: r.list_shards("raw")),
        ("shards/raw/commits/k.json", lambda r: r.list_shards("raw")),
        ("shards/raw/README.md", lambda r: r.list_shards("raw")),
        ("shards/stray.csv", lambda r: r.stages()),
        ("metrics/train/data.csv", lambda r: r.read_metrics("train")),
        ("weights/old-model.bin", lambda r: r.list_weight_versions()),
        ("checkpoints/best/x.pt", lambda r: r.list_checkpoints()),
        ("curriculum/state.json", lambda r: r.load_curriculum()),
    ],
)
def test_foreign_files_are_named(backend, make_rollouts, rel, call):
    run = _run(backend)
    run.commit_shard("raw", "a", make_rollouts("r1", "a"))
    path = _path(run.url) + "/" + rel
    _put(_fs(backend), path, b"hello")
    with pytest.raises(ForeignFileError, match="move it out of the run directory") as e:
        call(run)
    assert rel.rsplit("/", 1)[0] in str(e.value)
    assert run.read_shard("raw", "a").num_rows > 0  # committed data untouched


def test_clean_orphans_never_touches_committed_data(backend, make_rollouts, tmp_path):
    run = _run(backend)
    info = run.commit_shard("raw", "a", make_rollouts("r1", "a"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "m").write_bytes(b"m")
    run.publish_weights(0, tmp_path / "w")
    run.save_checkpoint(5, tmp_path / "w")
    assert run.clean_orphans(older_than_s=0) == []
    assert run.list_shards("raw") == [info]
    assert run.list_weight_versions() == [0] and run.list_checkpoints() == [5]


def test_racing_writers_of_one_key_agree(backend, make_rollouts):
    from concurrent.futures import ThreadPoolExecutor

    run = _run(backend)
    table = make_rollouts("r1", "k", n=30)
    with ThreadPoolExecutor(4) as pool:
        infos = list(pool.map(lambda _: run.commit_shard("raw", "k", table), range(4)))
    assert len(set(infos)) == 1 and run.list_shards("raw") == infos[:1]
    data_dir = infos[0].url.rsplit("/", 1)[0]
    assert len(_fs(backend).ls(_path(data_dir))) == 1  # losers removed their attempts


def test_listing_reads_each_commit_record_once_and_sees_changes(backend, make_rollouts):
    # Listing a stage used to re-read every commit record on every call. Records are parsed
    # once per process now (keyed by URL and the listing's size and mtime): a second listing
    # reads none, a new shard is read alone, and a record rewritten in place (a different
    # size) is read again, so a foreign file is still caught.
    run = _run(backend)
    run.commit_shard("raw", "a", make_rollouts("r1", "a"))
    run.commit_shard("raw", "b", make_rollouts("r1", "b"))
    fs = run._shards._loc.fs
    reads: list[list[str]] = []
    original_cat = fs.cat

    def counting_cat(paths, *args, **kwargs):
        reads.append(sorted(p.rsplit("/", 1)[-1] for p in paths))
        return original_cat(paths, *args, **kwargs)

    fs.cat = counting_cat
    try:
        first = [i.key for i in run.list_shards("raw")]
        again = [i.key for i in run.list_shards("raw")]
        run.commit_shard("raw", "c", make_rollouts("r1", "c"))
        third = [i.key for i in run.list_shards("raw")]
    finally:
        del fs.cat
    assert first == again == ["a", "b"] and third == ["a", "b", "c"]
    # the first listing may hit records parsed at commit time by an earlier test's Run only
    # if the URL were the same: each test has its own root, so it reads both records
    assert reads == [["a.json", "b.json"], ["c.json"]]
    record = _path(run._shards._loc.url_of(run._shards._record_path("raw", "b")))
    _put(_fs(backend), record, json.dumps({"format": "something else", "pad": "x" * 50}).encode())
    with pytest.raises(ForeignFileError, match="not a commit record"):
        run.list_shards("raw")
