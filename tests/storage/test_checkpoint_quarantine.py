"""A checkpoint damaged after its commit (a file truncated or deleted) is told apart from a
republish, found by a listing (sizes), and quarantined: copied aside with a reason, then taken
out of use; a repeated quarantine is a no-op."""

import json

import pytest

from storage import open_store
from storage.dirs import DamagedEntryError
from storage.errors import NotCommittedError

OPTIMIZER = b"o" * 5000
MODEL = b"m" * 3000


def _checkpoint(tmp_path, name="ckpt"):
    d = tmp_path / name
    (d / "model").mkdir(parents=True)
    (d / "model" / "model.safetensors").write_bytes(MODEL)
    (d / "optimizer.pt").write_bytes(OPTIMIZER)
    (d / "ledger.jsonl").write_text('{"version": 0}\n')
    return d


@pytest.fixture
def run(backend):
    url, options = backend
    return open_store(url, storage_options=options).run("r1", create=True)


def _fs_path(run, rel):
    return f"{run._root}/{rel}"


def _truncate(run, rel, size=1000):
    fs = run._loc.fs
    path = _fs_path(run, rel)
    data = fs.cat_file(path)
    fs.pipe_file(path, data[:size])


def test_a_truncated_file_is_damage_not_a_republish(run, tmp_path):
    run.save_checkpoint(4, _checkpoint(tmp_path))
    _truncate(run, "checkpoints/step-4/optimizer.pt")
    assert run.checkpoint_damage() == {4: ["optimizer.pt is 1,000 bytes, its manifest says 5,000"]}
    with pytest.raises(DamagedEntryError) as err:
        run.load_checkpoint(4, tmp_path / "dl")
    msg = str(err.value)
    assert "checkpoint step-4" in msg and "is damaged" in msg
    assert "optimizer.pt is 1,000 bytes, its manifest says 5,000" in msg
    assert "not republished" in msg and "republished while" not in msg


def test_a_deleted_file_is_named(run, tmp_path):
    run.save_checkpoint(2, _checkpoint(tmp_path))
    run._loc.fs.rm_file(_fs_path(run, "checkpoints/step-2/model/model.safetensors"))
    expected = "model/model.safetensors is missing (its manifest lists 3,000 bytes)"
    assert run.checkpoint_damage([2]) == {2: [expected]}
    with pytest.raises(DamagedEntryError, match="model/model.safetensors is missing"):
        run.load_checkpoint(2, tmp_path / "dl")


def test_same_size_alteration_needs_the_checksum(run, tmp_path):
    run.save_checkpoint(2, _checkpoint(tmp_path))
    run._loc.fs.pipe_file(_fs_path(run, "checkpoints/step-2/optimizer.pt"), b"x" * 5000)
    assert run.checkpoint_damage() == {2: []}  # a listing sees sizes only
    run.load_checkpoint(2, tmp_path / "sizes-only")
    with pytest.raises(
        DamagedEntryError, match="optimizer.pt does not match its manifest's sha256"
    ):
        run.load_checkpoint(2, tmp_path / "dl", checksum=True)


def test_only_the_named_files_are_downloaded(run, tmp_path):
    run.save_checkpoint(2, _checkpoint(tmp_path))
    _truncate(run, "checkpoints/step-2/optimizer.pt")
    local = run.load_checkpoint(2, tmp_path / "dl", files=["ledger.jsonl"], checksum=True)
    assert sorted(p.name for p in local.rglob("*") if p.is_file()) == ["ledger.jsonl"]


def test_quarantine_copies_then_removes_and_a_repeat_is_a_no_op(run, tmp_path):
    run.save_checkpoint(2, _checkpoint(tmp_path, "c2"))
    run.save_checkpoint(4, _checkpoint(tmp_path, "c4"))
    _truncate(run, "checkpoints/step-4/optimizer.pt")
    doc = run.quarantine_checkpoint(4, "optimizer.pt is 1,000 bytes", by="trainer")
    assert doc["entry"] == "step-4" and doc["number"] == 4 and doc["by"] == "trainer"
    assert sorted(doc["files_copied"]) == [
        "ledger.jsonl",
        "model/model.safetensors",
        "optimizer.pt",
    ]
    assert doc["files_missing"] == []
    assert doc["copy"].startswith(run.url + "/quarantine/checkpoints/step-4/q-")
    # out of use: the listing and the latest step skip it, its originals are gone
    assert run.list_checkpoints() == [2] and run.latest_checkpoint_step() == 2
    fs = run._loc.fs
    assert not fs.exists(_fs_path(run, "checkpoints/step-4/optimizer.pt"))
    assert not fs.exists(_fs_path(run, "checkpoints/step-4/_MANIFEST.json"))
    # the copies hold what was there (the truncated file as it was found)
    qdir = doc["copy"][len(run.url) + 1 :]
    assert fs.cat_file(_fs_path(run, f"{qdir}/files/optimizer.pt")) == OPTIMIZER[:1000]
    assert fs.cat_file(_fs_path(run, f"{qdir}/files/model/model.safetensors")) == MODEL
    manifest = json.loads(fs.cat_file(_fs_path(run, f"{qdir}/_MANIFEST.json")))
    assert {f["path"]: f["bytes"] for f in manifest["files"]}["optimizer.pt"] == 5000
    assert run.list_quarantined_checkpoints() == [doc]
    assert run.checkpoint_quarantine_problems() == []
    # a repeat changes nothing and returns the first record
    assert run.quarantine_checkpoint(4, "again", by="someone") == doc
    assert run.list_quarantined_checkpoints() == [doc]
    # shard quarantine listings do not mistake it for a shard
    assert run.list_quarantined() == [] and run.quarantine_problems() == []
    # the step can be committed again (a resumed trainer retrains it) and stays separate
    run.save_checkpoint(4, _checkpoint(tmp_path, "c4b"))
    assert run.list_checkpoints() == [2, 4] and run.checkpoint_damage() == {2: [], 4: []}
    assert run.quarantine_checkpoint(4, "x") != doc  # a new commit: a new quarantine entry
    assert len(run.list_quarantined_checkpoints()) == 2


def test_a_crash_after_the_copies_leaves_the_checkpoint_committed(run, tmp_path, monkeypatch):
    from storage import fsio

    class Killed(Exception):
        pass

    def fault(name):
        if name == "checkpoint.quarantine.copied":
            raise Killed(name)

    run.save_checkpoint(4, _checkpoint(tmp_path))
    monkeypatch.setattr(fsio, "fault_point", fault)
    with pytest.raises(Killed):
        run.quarantine_checkpoint(4, "damaged")
    monkeypatch.undo()
    assert run.list_checkpoints() == [4] and run.list_quarantined_checkpoints() == []
    assert run.checkpoint_damage() == {4: []}  # nothing was removed before the reason
    doc = run.quarantine_checkpoint(4, "damaged")
    assert run.list_checkpoints() == [] and run.list_quarantined_checkpoints() == [doc]


def test_a_quarantine_record_lacking_a_copy_is_a_problem(run, tmp_path):
    run.save_checkpoint(4, _checkpoint(tmp_path))
    doc = run.quarantine_checkpoint(4, "damaged")
    qdir = doc["copy"][len(run.url) + 1 :]
    run._loc.fs.rm_file(_fs_path(run, f"{qdir}/files/optimizer.pt"))
    (problem,) = run.checkpoint_quarantine_problems()
    assert problem.startswith("quarantined checkpoint step-4 lacks its copy of optimizer.pt")


def test_unknown_step_is_not_committed(run):
    with pytest.raises(NotCommittedError):
        run.quarantine_checkpoint(9, "x")


def test_weights_damage_names_missing_versions(run, tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"w" * 700)
    for v in (0, 1, 2):
        run.publish_weights(v, d)
    run._loc.fs.rm_file(_fs_path(run, "weights/v2/model.safetensors"))
    run._loc.fs.rm_file(_fs_path(run, "weights/v1/_MANIFEST.json"))
    assert run.weights_damage([0, 1, 2]) == {
        0: [],
        1: None,
        2: ["model.safetensors is missing (its manifest lists 700 bytes)"],
    }
