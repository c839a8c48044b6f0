"""Atomic write helpers on local disk, including filesystems without hard links."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from storage import fsio
from storage.paths import open_location


def test_write_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    loc = open_location(str(tmp_path))
    path = f"{loc.root}/a/b.json"
    fsio.write_atomic(loc, path, b"one")
    fsio.write_atomic(loc, path, b"two")
    assert Path(path).read_bytes() == b"two"
    assert os.listdir(tmp_path / "a") == ["b.json"]


def test_create_exclusive_never_replaces(tmp_path, monkeypatch):
    loc = open_location(str(tmp_path))
    path = f"{loc.root}/rec.json"
    assert fsio.create_exclusive(loc, path, b"first")
    assert not fsio.create_exclusive(loc, path, b"second")
    assert Path(path).read_bytes() == b"first"

    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    other = f"{loc.root}/rec2.json"
    assert fsio.create_exclusive(loc, other, b"x")
    assert not fsio.create_exclusive(loc, other, b"y")
    assert Path(other).read_bytes() == b"x"
    assert sorted(os.listdir(tmp_path)) == ["rec.json", "rec2.json"]
