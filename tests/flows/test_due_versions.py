"""flows.run.due_versions: which weight versions the run loop evaluates next, without listing."""

import pytest

from flows.run import due_versions
from storage import open_store
from storage.dirs import ManifestDirs


def test_due_versions_are_committed_multiples_up_to_latest_not_done(tmp_path, monkeypatch):
    run = open_store(str(tmp_path / "runs")).run("r1", create=True)
    assert due_versions(run, 3, {}) == []  # nothing published yet
    (tmp_path / "w").mkdir()
    for v in range(8):
        (tmp_path / "w" / "m.bin").write_bytes(bytes([v]) * 4)
        run.publish_weights(v, tmp_path / "w")
    # v6's upload died before its manifest: not committed, so not due (written out: the
    # multiples of 3 in 0..7 are 0, 3, 6; 0 is done)
    (tmp_path / "runs" / "r1" / "weights" / "v6" / "_MANIFEST.json").unlink()

    def no_listing(*_):
        raise AssertionError("due_versions listed every weight version")

    monkeypatch.setattr(ManifestDirs, "list", no_listing)  # below every listing of versions
    assert due_versions(run, 3, {0: None}) == [3]
    assert due_versions(run, 3, {}) == [0, 3]
    assert due_versions(run, 1, {v: None for v in range(5)}) == [5, 7]
    assert due_versions(run, 8, {}) == [0]


@pytest.mark.parametrize("every", [1, 2, 5])
def test_due_versions_match_the_listing(tmp_path, every):
    run = open_store(str(tmp_path / "runs")).run("r1", create=True)
    (tmp_path / "w").mkdir()
    for v in range(11):
        (tmp_path / "w" / "m.bin").write_bytes(bytes([v]) * 4)
        run.publish_weights(v, tmp_path / "w")
    done = {0: None, 4: None}
    listed = [v for v in run.list_weight_versions() if v % every == 0 and v not in done]
    assert due_versions(run, every, done) == listed
