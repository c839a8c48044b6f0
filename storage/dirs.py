"""Directories published with a manifest: policy weights (weights/v{N}/) and trainer
checkpoints (checkpoints/step-{N}/).

    weights/v{N}/<files...>          uploaded file by file
    weights/v{N}/_MANIFEST.json      written last: [{path, bytes, sha256}], committed_at
    weights/LATEST                   {"weights": N}, moved forward after the manifest

A directory without a manifest is invisible (a writer died mid-upload, or a remove died between
the manifest and the files); remove(n) deletes the ones numbered below n, which no publish can be
writing (remove_unpublished). A reader downloads exactly the manifest's files and checks their
sizes. Publishing a committed entry again is
a no-op when every file's digest matches; different content raises CommitConflictError
unless overwrite=True, which first withdraws the manifest so readers never mix old and new
files. The LATEST pointer is a hint for cheap polling; listings read manifests.

Damage after the commit (a file truncated, altered or deleted) is told apart from a republish:
download re-reads the manifest, and if it is unchanged raises DamagedEntryError naming the
file; `damage`/`damage_many` find missing and wrong-sized files from one listing (sizes only,
nothing is hashed); `quarantine` takes a damaged entry out of use:

    quarantine/{base}/{prefix}{N}/q-{digest}/files/<files...>   copies of the files present
    quarantine/{base}/{prefix}{N}/q-{digest}/_MANIFEST.json     copy of the manifest
    quarantine/{base}/{prefix}{N}/q-{digest}/reason.json        written after the copies

(digest: of the manifest, so one commit always lands in one place and a later commit of the
same number gets its own). Then the manifest is removed (readers stop seeing the entry) and the
originals that were copied; nothing is deleted before its copy exists, and a repeated call
finishes the job and returns the first reason record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from storage import fsio
from storage.errors import (
    CommitConflictError,
    ForeignFileError,
    InvalidInputError,
    NotCommittedError,
    StoreError,
)
from storage.paths import Location

TRANSFER_WORKERS = 8  # files of one entry moved at once: on an object store each is a round trip
MANIFEST = "_MANIFEST.json"
LATEST = "LATEST"
REASON = "reason.json"
QUARANTINE_FORMAT = "scalerl.quarantine-entry/1"
_QID_RE = re.compile(r"q-[0-9a-f]{12}")


class DamagedEntryError(StoreError):
    """A committed weights or checkpoint file is missing, or its size or checksum no longer
    matches the manifest (damaged after the commit; not a republish). `damage`: one string
    per damaged file."""

    def __init__(self, message: str, damage: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.damage = list(damage)


def _each(fn, items) -> list:
    """fn over items, up to TRANSFER_WORKERS at once (an entry's files are independent requests:
    a weights version of seven files costs one round trip instead of seven); results in order.
    The first failure (in item order) is raised once every call has ended."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    workers = min(TRANSFER_WORKERS, len(items))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="storage-transfer") as pool:
        futures = [pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ManifestDirs:
    """Numbered directories under `base`, named f"{prefix}{n}" (what: 'weights', ...)."""

    def __init__(
        self, loc: Location, base: str, prefix: str, what: str, quarantine: str | None = None
    ) -> None:
        """quarantine: the directory damaged entries are moved to (see quarantine())."""
        self._loc, self._base, self._prefix, self._what = loc, base, prefix, what
        parent, name = base.rsplit("/", 1)
        self._qbase = quarantine or f"{parent}/quarantine/{name}"
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

    def withdraw(self, n: int) -> None:
        """Take committed entry n out of use (its manifest goes; files stay) before it is
        written again in parts (upload_part, then publish with extra)."""
        with contextlib.suppress(FileNotFoundError):
            self._loc.fs.rm_file(f"{self.path(n)}/{MANIFEST}")

    def upload_part(self, n: int, local_dir: str | os.PathLike) -> list[dict]:
        """Upload the files of local_dir into entry n without committing it; returns their
        manifest entries, for the writer that commits the entry (publish(extra=...)). Used by
        writers on machines that share no file system (trainer nodes). Entry n must not be
        committed (withdraw it first): a committed entry's files never change."""
        if self._manifest(n) is not None:
            raise CommitConflictError(
                f"{self._what} {self._prefix}{n} is committed; its files are not rewritten in "
                "parts. Fix: withdraw it first."
            )
        src = Path(local_dir)

        def upload(p: Path) -> dict:
            rel = p.relative_to(src).as_posix()
            self._put(p, f"{self.path(n)}/{rel}")
            return {"path": rel, "bytes": p.stat().st_size, "sha256": _sha256(p)}

        return _each(upload, sorted(p for p in src.rglob("*") if p.is_file()))

    def _put(self, src: Path, target: str) -> None:
        if self._loc.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        self._loc.fs.put_file(str(src), target)

    def publish(
        self,
        n: int,
        local_dir: str | os.PathLike,
        *,
        overwrite: bool = False,
        extra: list[dict] | None = None,
    ) -> bool:
        """Upload local_dir as entry n; return False if it was already committed identically.
        extra: manifest entries of files other writers already uploaded into the entry
        (upload_part); they are listed in the manifest with the local ones."""
        src = Path(local_dir)
        files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else []
        if not files:
            raise InvalidInputError(
                f"{self._what} directory {src} does not exist or holds no files. "
                "Fix: save the files there first (e.g. model.save_pretrained(dir))."
            )
        entries = _each(
            lambda p: {
                "path": p.relative_to(src).as_posix(),
                "bytes": p.stat().st_size,
                "sha256": _sha256(p),  # hashlib drops the GIL: the files hash in parallel
            },
            files,
        )
        local_paths = {e["path"] for e in entries}
        uploaded = [e for e in extra or [] if e["path"] not in local_paths]
        listed = sorted([*entries, *uploaded], key=lambda e: e["path"])
        dest = self.path(n)
        old = self._manifest(n)
        if old is not None:
            if old.get("files") == listed:
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
        _each(
            lambda ep: self._put(ep[1], f"{dest}/{ep[0]['path']}"), zip(entries, files, strict=True)
        )
        fsio.fault_point(f"{self._what}.before_manifest")
        manifest = {"files": listed, "committed_at": time.time()}
        fsio.write_atomic(self._loc, f"{dest}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        self._advance(n)
        return True

    def remove(self, n: int) -> int:
        """Delete committed entry n for good (retention): its manifest first, so no reader
        trusts a half-deleted entry, then its files, then what earlier removes left half done
        (remove_unpublished below n). Returns the bytes its manifest listed (0 when it was not
        committed). The newest committed entry is never removed: the LATEST pointer and every
        reader rely on it."""
        manifest = self._manifest(n)
        if manifest is None:
            return 0
        if n == self._pointer():
            raise InvalidInputError(
                f"{self._what} {self._prefix}{n} is the newest one ({self._loc.url_of(self._base)}/"
                f"{LATEST} points at it) "
                "and is never deleted. Fix: delete only older entries."
            )
        dest = self.path(n)
        self._loc.fs.rm_file(f"{dest}/{MANIFEST}")
        fsio.fault_point(f"{self._what}.prune_after_manifest")
        with contextlib.suppress(FileNotFoundError):
            self._loc.fs.rm(dest, recursive=True)
        self.remove_unpublished(below=n)
        return sum(int(e.get("bytes", 0)) for e in manifest.get("files", []))

    def remove_unpublished(self, *, below: int) -> list[int]:
        """Delete the entries numbered below `below` that have no manifest: what a remove killed
        between its manifest and its files left (or a publish killed mid-upload that nothing
        redid). `below` is a committed entry (remove() passes the one it deletes, never the
        newest), so none of them is in flight: a publish writes the newest number, and a
        republish (overwrite) happens on the same thread as retention. One listing of the
        base; returns the numbers deleted."""
        base = self._base.rstrip("/").split("://")[-1] + "/"
        names: dict[str, bool] = {}  # entry name -> has a manifest
        for path in self._loc.fs.find(self._base, withdirs=True):
            rel = path.split("://")[-1].partition(base)[2]
            name, _, rest = rel.partition("/")
            if self._re.fullmatch(name):
                names[name] = names.get(name, False) or rest == MANIFEST
        doomed = sorted(
            n
            for name, committed in names.items()
            if not committed and (n := int(self._re.fullmatch(name).group(1))) < below
        )
        for n in doomed:
            with contextlib.suppress(FileNotFoundError):
                self._loc.fs.rm(self.path(n), recursive=True)
        return doomed

    def entry_bytes(self, numbers: list[int]) -> dict[int, int]:
        """Bytes each committed entry's manifest lists (one batched read; uncommitted left out)."""
        paths = {f"{self.path(n)}/{MANIFEST}": n for n in numbers}
        found = self._loc.fs.cat(list(paths), on_error="omit") if paths else {}
        out = {}
        for path, raw in found.items():
            n = paths.get(path) or paths.get(path.split("://", 1)[-1])
            if n is None:
                n = int(self._re.fullmatch(path.split("/")[-2]).group(1))
            out[n] = sum(int(e.get("bytes", 0)) for e in json.loads(raw).get("files", []))
        return out

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

    def files(self, n: int) -> list[str]:
        """The paths entry n's manifest lists (NotCommittedError when it is not committed)."""
        return [e["path"] for e in self._require(n)["files"]]

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

    def download(
        self,
        n: int,
        local_dir: str | os.PathLike,
        *,
        files: list[str] | None = None,
        checksum: bool = False,
    ) -> Path:
        """Download entry n (only the manifest paths in `files`, if given) into local_dir and
        check every file's size, and with checksum=True its sha256 (hashing the local copy).
        A mismatch or a missing file is NotCommittedError when the manifest changed meanwhile
        (republished: download again) and DamagedEntryError when it did not (the file itself
        was truncated, altered or deleted after the commit)."""
        raw = self._manifest_raw(n)
        if raw is None:
            self._require(n)  # raises NotCommittedError naming the committed entries
        manifest = json.loads(raw)
        self._check_paths(n, manifest)
        entries = manifest["files"]
        if files is not None:
            wanted = set(files)
            entries = [e for e in entries if e["path"] in wanted]
            unknown = sorted(wanted - {e["path"] for e in entries})
            if unknown:
                raise DamagedEntryError(
                    f"{self._what} {self._prefix}{n} at {self._loc.url_of(self.path(n))} has no "
                    f"{', '.join(unknown)} in its manifest. Fix: pick another {self._what}."
                )
        dst = Path(local_dir)

        def fetch(entry: dict) -> str | None:
            """The file's damage, None when it arrived whole."""
            target = dst / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._loc.fs.get_file(f"{self.path(n)}/{entry['path']}", str(target))
            except FileNotFoundError:
                return f"{entry['path']} is missing (its manifest lists {entry['bytes']:,} bytes)"
            size = target.stat().st_size
            if size != entry["bytes"]:
                return f"{entry['path']} is {size:,} bytes, its manifest says {entry['bytes']:,}"
            if checksum and entry.get("sha256") and _sha256(target) != entry["sha256"]:
                return f"{entry['path']} does not match its manifest's sha256"
            return None

        damage = [d for d in _each(fetch, entries) if d is not None]
        if self._manifest_raw(n) != raw:
            raise NotCommittedError(
                f"{self._what} {self._prefix}{n} was republished while downloading. "
                "Fix: download again."
            )
        if damage:
            raise DamagedEntryError(self.damage_message(n, damage), damage)
        return dst

    def damage_message(self, n: int, damage: list[str]) -> str:
        fix = (
            "Fix: resume the run: the trainer quarantines a damaged checkpoint and resumes from "
            "the previous intact one; or restore the file from a copy of the run."
            if self._what == "checkpoint"
            else "Fix: restore the file from a copy of the run; only a trainer that trains "
            "this version again republishes it."
        )
        return (
            f"{self._what} {self._prefix}{n} at {self._loc.url_of(self.path(n))} is damaged: "
            f"{'; '.join(damage)}. It was not republished (its manifest is unchanged): the "
            f"file was truncated, altered or deleted after the commit, or written damaged. {fix}"
        )

    def _manifest_raw(self, n: int) -> bytes | None:
        try:
            return fsio.read_bytes(self._loc, f"{self.path(n)}/{MANIFEST}")
        except FileNotFoundError:
            return None

    # -- damage found by listing (sizes; nothing is hashed) --------------------------------

    def _sizes(self, path: str) -> dict[str, int]:
        """Relative path -> size of every file under `path` (one recursive listing)."""
        try:
            infos = self._loc.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        prefix = path.strip("/") + "/"
        out = {}
        for name, info in infos.items():
            name = str(info.get("name", name)).strip("/")
            if info.get("type", "file") == "file" and name.startswith(prefix):
                out[name[len(prefix) :]] = int(info.get("size") or 0)
        return out

    @staticmethod
    def _compare(manifest: dict, sizes: dict[str, int]) -> list[str]:
        out = []
        for entry in manifest.get("files", []):
            got = sizes.get(entry["path"])
            if got is None:
                out.append(
                    f"{entry['path']} is missing (its manifest lists {entry['bytes']:,} bytes)"
                )
            elif got != entry["bytes"]:
                out.append(
                    f"{entry['path']} is {got:,} bytes, its manifest says {entry['bytes']:,}"
                )
        return out

    def damage(self, n: int) -> list[str]:
        """What is wrong with committed entry n's files (one listing, sizes only): one string
        per manifest file that is missing or of another size; [] when intact.
        NotCommittedError when n has no manifest."""
        manifest = self._require(n)
        self._check_paths(n, manifest)
        return self._compare(manifest, self._sizes(self.path(n)))

    def damage_many(self, numbers: list[int]) -> dict[int, list[str] | None]:
        """damage() of several entries from one batched manifest read and one listing of the
        whole base; None for an entry without a manifest."""
        numbers = sorted(set(numbers))
        if not numbers:
            return {}
        paths = {f"{self.path(n)}/{MANIFEST}": n for n in numbers}
        found = self._loc.fs.cat(list(paths), on_error="omit")
        manifests = {}
        for path, raw in found.items():
            n = self._re.fullmatch(path.rstrip("/").split("/")[-2]).group(1)
            manifests[int(n)] = json.loads(raw)
        sizes = self._sizes(self._base)
        out: dict[int, list[str] | None] = {}
        for n in numbers:
            if n not in manifests:
                out[n] = None
                continue
            self._check_paths(n, manifests[n])
            head = f"{self._prefix}{n}/"
            mine = {p[len(head) :]: b for p, b in sizes.items() if p.startswith(head)}
            out[n] = self._compare(manifests[n], mine)
        return out

    # -- quarantine ------------------------------------------------------------------------

    def quarantine(self, n: int, reason: str, error: str = "", by: str = "", **extra) -> dict:
        """Take committed entry n out of use (see the module docstring): copies under
        {quarantine}/{prefix}{n}/q-{digest}/, reason.json, then the manifest and the copied
        originals are removed. Returns the reason record; a repeated call (the entry is no
        longer committed) finishes the removal and returns the newest record for n.
        NotCommittedError when n is neither committed nor quarantined."""
        raw = self._manifest_raw(n)
        if raw is None:
            done = [d for d in self.quarantined() if d.get("number") == n]
            if not done:
                self._require(n)  # NotCommittedError naming the committed entries
            self._remove_originals(n, done[-1])
            return done[-1]
        manifest = json.loads(raw)
        self._check_paths(n, manifest)
        qdir = self._qdir_path(n, f"q-{hashlib.sha256(raw).hexdigest()[:12]}")
        doc = self._read_reason(f"{qdir}/{REASON}")
        if doc is None:
            copied, missing = [], []
            for entry in manifest["files"]:
                src, dst = f"{self.path(n)}/{entry['path']}", f"{qdir}/files/{entry['path']}"
                (copied if fsio.copy_file(self._loc, src, dst) else missing).append(entry["path"])
            fsio.write_atomic(self._loc, f"{qdir}/{MANIFEST}", raw)
            fsio.fault_point(f"{self._what}.quarantine.copied")
            doc = {
                "format": QUARANTINE_FORMAT,
                "what": self._what,
                "entry": f"{self._prefix}{n}",
                "number": n,
                "reason": str(reason),
                "error": error,
                "by": by,
                "quarantined_at": time.time(),
                "original": self._loc.url_of(self.path(n)),
                "copy": self._loc.url_of(qdir),
                "files_copied": copied,
                "files_missing": missing,
                **extra,
            }
            fsio.write_atomic(self._loc, f"{qdir}/{REASON}", json.dumps(doc, indent=1).encode())
        fsio.fault_point(f"{self._what}.quarantine.reason_written")
        with contextlib.suppress(FileNotFoundError):
            self._loc.fs.rm_file(f"{self.path(n)}/{MANIFEST}")  # readers stop seeing it
        self._remove_originals(n, doc)
        return doc

    def _remove_originals(self, n: int, doc: dict) -> None:
        """Delete the original files the record says were copied (once no manifest commits
        entry n again: a new commit of the same number keeps its files)."""
        if self._manifest_raw(n) is not None:
            return
        qdir = self._qdir_path(n, doc["copy"].rstrip("/").rsplit("/", 1)[-1])
        for rel in doc.get("files_copied", []):
            copy = f"{qdir}/files/{rel}"
            if not self._loc.fs.exists(copy):
                continue  # never delete what has no copy
            with contextlib.suppress(FileNotFoundError):
                self._loc.fs.rm_file(f"{self.path(n)}/{rel}")
        if self._loc.is_local:  # empty directories left behind
            for dirpath, _, _ in sorted(os.walk(self.path(n)), reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)

    def _qdir_path(self, n: int, qid: str) -> str:
        return f"{self._qbase}/{self._prefix}{n}/{qid}"

    def _read_reason(self, path: str) -> dict | None:
        try:
            doc = json.loads(fsio.read_bytes(self._loc, path))
        except FileNotFoundError:
            return None
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or doc.get("format") != QUARANTINE_FORMAT:
            raise ForeignFileError(
                f"{self._loc.url_of(path)} is not a quarantine record of the run store. Fix: "
                "move it out of the run directory."
            )
        return doc

    def _quarantine_listing(self) -> dict[tuple[int, str], set[str]]:
        """(number, q-id) -> relative paths of the files in that quarantine entry."""
        try:
            names = self._loc.fs.find(self._qbase)
        except FileNotFoundError:
            return {}
        prefix = self._qbase.strip("/") + "/"
        out: dict[tuple[int, str], set[str]] = {}
        for name in names:
            name = name.strip("/")
            parts = name[len(prefix) :].split("/", 2) if name.startswith(prefix) else []
            match = self._re.fullmatch(parts[0]) if len(parts) == 3 else None
            if match and _QID_RE.fullmatch(parts[1]):
                out.setdefault((int(match.group(1)), parts[1]), set()).add(parts[2])
        return out

    def quarantined(self) -> list[dict]:
        """Reason records of the quarantined entries, oldest first."""
        docs = []
        for (n, qid), names in self._quarantine_listing().items():
            if REASON in names:
                docs.append(self._read_reason(f"{self._qdir_path(n, qid)}/{REASON}"))
        return sorted(docs, key=lambda d: (d["quarantined_at"], d["number"]))

    def quarantine_problems(self) -> list[str]:
        """Quarantine entries missing a copy their reason record names."""
        problems = []
        for (n, qid), names in sorted(self._quarantine_listing().items()):
            if REASON not in names:
                continue  # interrupted before the reason: the entry is still committed
            doc = self._read_reason(f"{self._qdir_path(n, qid)}/{REASON}")
            lost = [MANIFEST] if MANIFEST not in names else []
            lost += [r for r in doc.get("files_copied", []) if f"files/{r}" not in names]
            if lost:
                problems.append(
                    f"quarantined {self._what} {self._prefix}{n} lacks its copy of "
                    f"{', '.join(lost)} ({doc['copy']})"
                )
        return problems

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
