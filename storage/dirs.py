"""Directories published with a manifest: policy weights (weights/v{N}/) and trainer
checkpoints (checkpoints/step-{N}/).

    weights/v{N}/<files...>          uploaded file by file
    weights/v{N}/_MANIFEST.json      written last: [{path, bytes, sha256}], committed_at
    weights/LATEST                   {"weights": N}, moved forward after the manifest

A directory without a manifest is invisible (a writer died mid-upload); a reader downloads
exactly the manifest's files and checks their sizes. Publishing a committed entry again is
a no-op when every file's digest matches; different content raises CommitConflictError
unless overwrite=True, which first withdraws the manifest so readers never mix old and new
files. The LATEST pointer is a hint for cheap polling; listings read manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from storage import fsio
from storage.errors import (
    CommitConflictError,
    ForeignFileError,
    InvalidInputError,
    NotCommittedError,
)
from storage.paths import Location

MANIFEST = "_MANIFEST.json"
LATEST = "LATEST"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ManifestDirs:
    """Numbered directories under `base`, named f"{prefix}{n}" (what: 'weights', ...)."""

    def __init__(self, loc: Location, base: str, prefix: str, what: str) -> None:
        self._loc, self._base, self._prefix, self._what = loc, base, prefix, what
        self._re = re.compile(re.escape(prefix) + r"(0|[1-9][0-9]*)")

    def path(self, n: int) -> str:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise InvalidInputError(
                f"{self._what} number {n!r} is not a non-negative integer. Fix: pass an int >= 0."
            )
        return f"{self._base}/{self._prefix}{n}"

    def _manifest(self, n: int) -> dict | None:
        try:
            return json.loads(fsio.read_bytes(self._loc, f"{self.path(n)}/{MANIFEST}"))
        except FileNotFoundError:
            return None

    def publish(self, n: int, local_dir: str | os.PathLike, *, overwrite: bool = False) -> bool:
        """Upload local_dir as entry n; return False if it was already committed identically."""
        src = Path(local_dir)
        files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else []
        if not files:
            raise InvalidInputError(
                f"{self._what} directory {src} does not exist or holds no files. "
                "Fix: save the files there first (e.g. model.save_pretrained(dir))."
            )
        entries = [
            {"path": p.relative_to(src).as_posix(), "bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in files
        ]
        dest = self.path(n)
        old = self._manifest(n)
        if old is not None:
            if old.get("files") == entries:
                # a retry of a publish whose pointer write failed (or a writer killed between
                # the two) lands here: the pointer must still move, or readers trust n - 1
                self._advance(n)
                return False
            if not overwrite:
                raise CommitConflictError(
                    f"{self._what} {self._prefix}{n} is already committed at "
                    f"{self._loc.url_of(dest)} with different files. Fix: publish under the "
                    "next number, or pass overwrite=True to replace it (e.g. a trainer resuming "
                    "from a checkpoint republishing the same version)."
                )
            self._loc.fs.rm_file(f"{dest}/{MANIFEST}")  # withdraw first: never mix versions
        for entry, p in zip(entries, files, strict=True):
            target = f"{dest}/{entry['path']}"
            if self._loc.is_local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            self._loc.fs.put_file(str(p), target)
        fsio.fault_point(f"{self._what}.before_manifest")
        manifest = {"files": entries, "committed_at": time.time()}
        fsio.write_atomic(self._loc, f"{dest}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        self._advance(n)
        return True

    def _advance(self, n: int) -> None:
        """Move the LATEST pointer forward to committed entry n (never back). It compares with
        the pointer as written, not latest_hint(): with no pointer yet that lists the entries,
        finds n's manifest, and the pointer was never written at all."""
        pointed = self._pointer()
        if pointed is None or n > pointed:
            pointer = json.dumps({self._what: n}).encode()
            fsio.write_atomic(self._loc, f"{self._base}/{LATEST}", pointer)

    def _pointer(self) -> int | None:
        """The number the LATEST pointer holds (committed or not), or None without one."""
        try:
            n = json.loads(fsio.read_bytes(self._loc, f"{self._base}/{LATEST}"))[self._what]
            self.path(n)  # a non-negative int, or InvalidInputError
            return n
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, InvalidInputError):
            raise ForeignFileError(
                f"{self._loc.url_of(self._base + '/' + LATEST)} is not a pointer written by the "
                "run store. Fix: move it out of the run directory."
            ) from None

    def latest_hint(self) -> int | None:
        """The LATEST pointer if it names a committed entry (two small reads), else the newest
        listed one (a listing plus one read per entry)."""
        n = self._pointer()
        if n is not None and self._loc.fs.exists(f"{self.path(n)}/{MANIFEST}"):
            return n
        listed = self.list()
        return listed[-1] if listed else None

    def _entries(self) -> list[tuple[int, dict]]:
        out = []
        for info in fsio.ls(self._loc, self._base):
            name = fsio.basename(info)
            match = self._re.fullmatch(name)
            if name == LATEST and info["type"] == "file":
                continue
            if not match or info["type"] != "directory":
                raise ForeignFileError(
                    f"{self._loc.url_of(info['name'])} is not a {self._what} entry "
                    f"({self._prefix}N/). Fix: move it out of the run directory."
                )
            out.append((int(match.group(1)), info))
        return out

    def list(self) -> list[int]:
        """Committed entries (those with a manifest), ascending."""
        paths = [f"{self.path(n)}/{MANIFEST}" for n, _ in self._entries()]
        # One batched read (concurrent on S3) instead of a request per entry.
        found = self._loc.fs.cat(paths, on_error="omit") if paths else {}
        return sorted(int(self._re.fullmatch(p.split("/")[-2]).group(1)) for p in found)

    def url(self, n: int) -> str:
        self._require(n)
        return self._loc.url_of(self.path(n))

    def has(self, n: int) -> bool:
        return self._manifest(n) is not None

    def _require(self, n: int) -> dict:
        manifest = self._manifest(n)
        if manifest is None:
            raise NotCommittedError(
                f"{self._what} {self._prefix}{n} is not committed at "
                f"{self._loc.url_of(self.path(n))}. Fix: pick one of {self.list()}."
            )
        return manifest

    def _check_paths(self, n: int, manifest: dict) -> None:
        """Every listed path must stay inside the entry: a tampered manifest could otherwise
        make a download write (or read) outside its directory."""
        for entry in manifest.get("files", []):
            rel = entry.get("path") if isinstance(entry, dict) else None
            parts = rel.split("/") if isinstance(rel, str) else [""]
            if "\\" in str(rel) or any(p in ("", ".", "..") for p in parts):
                raise ForeignFileError(
                    f"{self._loc.url_of(self.path(n) + '/' + MANIFEST)} lists {rel!r}, which is "
                    f"not a plain relative path inside {self._prefix}{n}/ (the run store never "
                    "writes one). Fix: move that entry out of the run directory."
                )

    def download(self, n: int, local_dir: str | os.PathLike) -> Path:
        manifest = self._require(n)
        self._check_paths(n, manifest)
        dst = Path(local_dir)
        for entry in manifest["files"]:
            target = dst / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            self._loc.fs.get_file(f"{self.path(n)}/{entry['path']}", str(target))
            if target.stat().st_size != entry["bytes"]:
                raise NotCommittedError(
                    f"{self._what} file {entry['path']} of {self._prefix}{n} changed while "
                    "downloading (it was republished). Fix: download again."
                )
        if self._manifest(n) != manifest:
            raise NotCommittedError(
                f"{self._what} {self._prefix}{n} was republished while downloading. "
                "Fix: download again."
            )
        return dst

    def orphans(self, older_than: float) -> list[str]:
        """Entries without a manifest whose files are all older than `older_than`."""
        out = []
        for n, _ in self._entries():
            path = self.path(n)
            if self._loc.fs.exists(f"{path}/{MANIFEST}"):
                continue
            infos = self._loc.fs.find(path, detail=True).values()
            if all(fsio.mtime(i) < older_than for i in infos):
                out.append(path)
        return out
