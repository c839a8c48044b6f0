"""A damaged curriculum file (curriculum/vN.json cut in half, not JSON, or JSON without the keys
of a curriculum state) is never a crash: load_curriculum() falls back to the newest intact
version with a warning naming the damaged file, an explicit version raises one line naming the
file and the fix, and the next save of that version moves the damaged file aside (a copy under
quarantine/curriculum/) instead of refusing it as a conflict. Real files, no mocks."""

import json
import logging

import pytest

from storage import open_store
from storage.errors import CommitConflictError
from storage.store import DamagedCurriculumError

KEYS = [f"gen0-{i:06d}" for i in range(4)]


def _state(n: int) -> dict:
    """Curriculum state v{n}: the first n keys applied, prompt p{i} retired for i < n."""
    return {"sampler": {"retired": [f"p{i}" for i in range(n)]}, "applied": KEYS[:n]}


@pytest.fixture
def run(tmp_path):
    run = open_store(str(tmp_path / "runs")).run("cur", create=True)
    for n in range(4):
        run.save_curriculum(_state(n), n)
    return run


def _path(tmp_path, n: int):
    return tmp_path / "runs" / "cur" / "curriculum" / f"v{n}.json"


DAMAGE = {
    "cut in half": lambda raw: raw[: len(raw) // 2],
    "not JSON": lambda raw: b"\x00garbage\xff",
    "a JSON list": lambda raw: b"[1, 2]",
    "no version": lambda raw: json.dumps({"state": json.loads(raw)["state"]}).encode(),
    "no state": lambda raw: json.dumps({"version": 3}).encode(),
    "another version": lambda raw: json.dumps({**json.loads(raw), "version": 7}).encode(),
    "no applied": lambda raw: json.dumps(
        {"version": 3, "state": {"sampler": json.loads(raw)["state"]["sampler"]}}
    ).encode(),
    "no sampler": lambda raw: json.dumps(
        {"version": 3, "state": {"applied": json.loads(raw)["state"]["applied"]}}
    ).encode(),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_the_newest_version_damaged_falls_back_and_is_replaced_by_the_next_save(
    run, tmp_path, caplog, how
):
    path = _path(tmp_path, 3)
    path.write_bytes(DAMAGE[how](path.read_bytes()))
    damaged = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="storage.store"):
        assert run.load_curriculum() == (2, _state(2))
    assert any(str(path) in r.getMessage() and "v2" in r.getMessage() for r in caplog.records)

    with pytest.raises(DamagedCurriculumError) as err:
        run.load_curriculum(3)
    message = str(err.value)
    assert str(path) in message and "Fix:" in message and "\n" not in message

    # the curriculum stage saves v3 again (rebuilt from v2): the damaged file is moved aside,
    # not a conflict; its bytes are kept under quarantine/curriculum/v3/
    run.save_curriculum(_state(3), 3)
    assert run.load_curriculum() == (3, _state(3))
    copies = list((tmp_path / "runs" / "cur" / "quarantine" / "curriculum" / "v3").iterdir())
    assert [c.read_bytes() for c in copies] == [damaged]
    assert run.list_curriculum_versions() == [0, 1, 2, 3]


def test_every_version_damaged_loads_none_and_prepare_can_start_over(run, tmp_path):
    for n in range(4):
        _path(tmp_path, n).write_bytes(b"{")
    assert run.load_curriculum() is None
    run.save_curriculum(_state(0), 0)
    assert run.load_curriculum() == (0, _state(0))


def test_an_intact_version_is_still_refused_as_a_conflict(run):
    with pytest.raises(CommitConflictError, match="already committed"):
        run.save_curriculum(_state(1), 3)
    assert run.load_curriculum() == (3, _state(3))


def test_a_version_deleted_mid_read_falls_back_quietly(run, tmp_path):
    _path(tmp_path, 3).unlink()
    assert run.load_curriculum() == (2, _state(2))
