"""A full file system is named as the one that is full (storage/fsio.py _full_error): the run
store when a write into it fills it (not the staging file under TMPDIR the bytes came from), and
a local directory outside the store (TMPDIR, a download target) when that one fills. Real
1 MiB tmpfs mounts (root only; skipped elsewhere), a real local run store, real copies."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from storage import open_store
from storage.errors import StorageFullError

FIX_TAIL = "then continue the run with `scalerl resume RUN_ID`: what was committed is intact."


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _weights_dir(where: Path, mib: int) -> Path:
    where.mkdir(parents=True)
    (where / "model.safetensors").write_bytes(b"\1" * (mib << 20))
    (where / "config.json").write_text("{}")
    return where


def test_a_full_store_is_named_not_the_staging_file(tiny_disk, tmp_path):
    root = tiny_disk / "runs"
    run = open_store(str(root)).run("r", create=True)
    staged = _weights_dir(tmp_path / "staging" / "v1", 2)  # 2 MiB into a 1 MiB store
    with pytest.raises(StorageFullError) as raised:
        run.publish_weights(1, staged)
    msg = str(raised.value)
    # the destination inside the store, never the source it was copied from
    assert msg.startswith(f"no space left on the storage of {root} (writing {root}/r/weights/v1/")
    assert str(staged) not in msg
    assert msg.endswith(
        "Fix: free space there or raise the quota (or move the run to a larger disk), " + FIX_TAIL
    )
    assert run.list_weight_versions() == []  # nothing half-written is visible


def test_a_full_local_directory_outside_the_store_is_named_not_the_store(tiny_disk, tmp_path):
    root = tmp_path / "runs"  # the store has room: the download target does not
    run = open_store(str(root)).run("r", create=True)
    run.publish_weights(1, _weights_dir(tmp_path / "staging" / "v1", 2))
    target = tiny_disk / "download"
    with pytest.raises(StorageFullError) as raised:
        run.download_weights(1, target)
    msg = str(raised.value)
    assert msg.startswith(
        f"no space left on the local file system at {tiny_disk} (writing {target}/"
    ), msg
    assert f"not on the run store {root}. Fix: free space on {tiny_disk}, or point TMPDIR" in msg
    assert msg.endswith(FIX_TAIL)
    assert run.list_weight_versions() == [1]  # the store is untouched
