"""Rollout shards under {run}/shards/{stage}/ and their commit protocol.

    shards/{stage}/data/{key}.{attempt}.parquet   data, one file per write attempt
    shards/{stage}/commits/{key}.json             commit record, written last, exclusively

A writer serializes the table once (Parquet zstd, schema version + run id in the key-value
metadata), uploads it under a fresh attempt name, then creates the commit record with an
exclusive create. Readers list and open commit records only, so they never see a partial or
uncommitted file; a dead writer leaves at most an unreferenced data file (an orphan, removed
by Run.clean_orphans). The record carries rows, bytes, the CRC-32 and the sha256 of the data
file; reads verify size and CRC-32, so a truncated or altered file is a CorruptShardError
rather than wrong data (CRC-32 runs at several GB/s; a cryptographic digest cost 15% of a
read). The sha256 (computed once, at the commit) is what `scalerl runs verify` checks the file
against (content_damage); records written before it was added carry none and are checked by
their CRC-32.

The hot path does no extra round trip: the data goes up, then the exclusive create of the
record decides. Only when the key is already committed (a retry) is the existing shard read
back and compared as a table: equal is a no-op that returns the existing ShardInfo, anything
else is CommitConflictError, and the losing attempt's data file is deleted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import fsio
from storage.errors import (
    CommitConflictError,
    CorruptShardError,
    ForeignFileError,
    InvalidRolloutsError,
    SchemaVersionError,
    ShardNotFoundError,
)
from storage.paths import Location, validate_name
from storage.schema import RUN_ID_KEY, SCHEMA_VERSION, VERSION_KEY, validate_rollouts

RECORD_FORMAT = "scalerl.commit/1"
QUARANTINE_FORMAT = "scalerl.quarantine/1"
_ATTEMPT_RE = re.compile(r"[0-9a-f]{12}")
_DATA_RE = re.compile(r"data/([A-Za-z0-9][A-Za-z0-9._-]*)\.([0-9a-f]{12})\.parquet")
_MOVE_OUT = "Fix: move it out of the run directory (only the run store writes there)."


@dataclass(frozen=True)
class ShardInfo:
    """A committed shard as listed by Run.list_shards."""

    stage: str
    key: str
    rows: int
    bytes: int
    committed_at: float  # epoch seconds, from the committing writer's clock
    url: str  # full URL of the Parquet data file


PARQUET_OPTIONS = {"compression": "zstd"}


def _with_metadata(table: pa.Table, run_id: str) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[VERSION_KEY] = str(SCHEMA_VERSION).encode()
    meta[RUN_ID_KEY] = run_id.encode()
    return table.replace_schema_metadata(meta)


def _write_local(path: str, table: pa.Table) -> tuple[int, int, str]:
    """Stream Parquet straight to disk (no in-memory copy of the file); return (bytes, crc32,
    sha256).
    Re-reading the fresh file from the page cache for the checksum is cheaper than building
    the whole file in memory first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with pq.ParquetWriter(path, table.schema, **PARQUET_OPTIONS) as writer:
        writer.write_table(table)
        fsio.fault_point("shard.data.partial")  # pages are on disk, the footer is not
    with open(path, "rb") as f:
        data = f.read()
    return len(data), zlib.crc32(data), hashlib.sha256(data).hexdigest()


def _checksums(data) -> tuple[int, str]:
    """(crc32, sha256 hex) of a buffer: one pool task, overlapping the upload."""
    return zlib.crc32(data), hashlib.sha256(data).hexdigest()


@functools.cache
def _crc_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage-crc")


class _RecordCache:
    """Parsed commit records by (URL, listing stamp), shared by every Run of this process:
    listing a stage used to re-read every record of it (O(shards) reads per poll). The
    records are shared, so callers only read them."""

    def __init__(self, max_entries: int) -> None:
        self._max, self._lock = max_entries, threading.Lock()
        self._data: OrderedDict[tuple, dict] = OrderedDict()

    def get(self, key: tuple) -> dict | None:
        with self._lock:
            record = self._data.get(key)
            if record is not None:
                self._data.move_to_end(key)
            return record

    def put(self, key: tuple, record: dict) -> None:
        with self._lock:
            self._data[key] = record
            while len(self._data) > self._max:
                self._data.popitem(last=False)


_RECORDS = _RecordCache(max_entries=20_000)
_LISTED = _RecordCache(max_entries=20_000)  # record URL -> the record the last listing saw
LAYOUT_CHECK_S = 60.0  # object stores: a stage directory's layout is checked this often
_LAYOUT_CHECKED: dict[str, float] = {}  # stage directory URL -> when (monotonic) it was


class Shards:
    """Shard operations of one run; Run delegates to this."""

    def __init__(self, loc: Location, run_root: str, run_id: str) -> None:
        self._loc, self._root, self._run_id = loc, run_root + "/shards", run_id
        self._quarantine = run_root + "/quarantine"

    def _stage_dir(self, stage: str) -> str:
        return f"{self._root}/{validate_name(stage, 'stage name')}"

    def _record_path(self, stage: str, key: str) -> str:
        return f"{self._stage_dir(stage)}/commits/{validate_name(key, 'shard key')}.json"

    # -- write -----------------------------------------------------------------------------

    def commit(self, stage: str, key: str, table: pa.Table) -> ShardInfo:
        record_path = self._record_path(stage, key)
        validate_rollouts(table)
        run_ids = table.column("run_id")
        if table.num_rows and not pc.all(pc.equal(run_ids, self._run_id)).as_py():
            other = pc.filter(run_ids, pc.not_equal(run_ids, self._run_id))[0].as_py()
            raise InvalidRolloutsError(
                f"shard {stage}/{key} has rows of run {other!r} but is committed to run "
                f"{self._run_id!r}. Fix: set run_id to {self._run_id!r} in every row, or commit "
                "to the run that produced the rows."
            )
        table = _with_metadata(table, self._run_id)
        rel = f"data/{key}.{uuid.uuid4().hex[:12]}.parquet"
        data_path = f"{self._stage_dir(stage)}/{rel}"
        try:
            if self._loc.is_local:
                size, crc, sha = _write_local(data_path, table)
            else:
                sink = pa.BufferOutputStream()
                pq.write_table(table, sink, **PARQUET_OPTIONS)
                data = sink.getvalue()
                checksum = _crc_pool().submit(_checksums, data)  # overlaps the upload
                fsio.put_unreferenced(self._loc, data_path, data.to_pybytes(), "shard.data")
                size, (crc, sha) = data.size, checksum.result()
        except Exception:
            with contextlib.suppress(Exception):  # best effort; clean_orphans is the backstop
                self._loc.fs.rm_file(data_path)
            raise
        fsio.fault_point("shard.data.after")
        record = {
            "format": RECORD_FORMAT,
            "run_id": self._run_id,
            "stage": stage,
            "key": key,
            "data": rel,
            "rows": table.num_rows,
            "bytes": size,
            "crc32": crc,
            "sha256": sha,  # checked by `scalerl runs verify` (content_damage); reads use crc32
            "schema_version": SCHEMA_VERSION,
            "committed_at": time.time(),
        }
        payload = json.dumps(record, indent=1).encode()
        if not fsio.create_exclusive(self._loc, record_path, payload):
            self._loc.fs.rm_file(data_path)  # committed before (a retry) or by a racing writer
            return self._resolve_existing(stage, key, table)
        fsio.fault_point("shard.committed")
        return self._info(record)

    def _resolve_existing(self, stage: str, key: str, table: pa.Table) -> ShardInfo:
        record = self._read_record(stage, key)
        existing = self.read(stage, key)
        plain = table.schema.remove_metadata()
        with contextlib.suppress(pa.ArrowException):  # an uncastable table is not equal
            if existing.schema.names == plain.names and existing.cast(plain).equals(
                table.replace_schema_metadata(None)
            ):
                return self._info(record)
        raise CommitConflictError(
            f"shard {stage}/{key} of run {self._run_id!r} is already committed with different "
            f"content ({record['rows']} rows at {self._data_url(stage, record)}); it was left "
            "unchanged. Fix: keys must be derived from the input, so different content means a "
            "different key (e.g. a new attempt suffix), or delete the run's stage to redo it."
        )

    # -- read ------------------------------------------------------------------------------

    def _data_url(self, stage: str, record: dict) -> str:
        return self._loc.url_of(f"{self._stage_dir(stage)}/{record['data']}")

    def _info(self, record: dict) -> ShardInfo:
        return ShardInfo(
            stage=record["stage"],
            key=record["key"],
            rows=int(record["rows"]),
            bytes=int(record["bytes"]),
            committed_at=float(record["committed_at"]),
            url=self._data_url(record["stage"], record),
        )

    def _parse_record(self, path: str, raw: bytes, stage: str, key: str | None) -> dict:
        url = self._loc.url_of(path)
        try:
            record = json.loads(raw)
            ok = record.get("format") == RECORD_FORMAT
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise ForeignFileError(f"{url} is not a commit record of the run store. {_MOVE_OUT}")
        match = _DATA_RE.fullmatch(str(record.get("data")))
        if record.get("run_id") != self._run_id:
            raise ForeignFileError(
                f"commit record {url} belongs to run {record.get('run_id')!r}, not "
                f"{self._run_id!r} (copied from another run?). {_MOVE_OUT}"
            )
        if (
            record.get("stage") != stage
            or (key is not None and record.get("key") != key)
            or not match
            or match.group(1) != record.get("key")
        ):
            raise ForeignFileError(f"commit record {url} does not match its location. {_MOVE_OUT}")
        return record

    def _read_record(self, stage: str, key: str) -> dict:
        path = self._record_path(stage, key)
        try:
            raw = fsio.read_bytes(self._loc, path)
        except FileNotFoundError:
            raise ShardNotFoundError(
                f"shard {stage}/{key} of run {self._run_id!r} is not committed (no "
                f"{self._loc.url_of(path)}). Fix: check list_shards({stage!r}) for committed "
                "keys, or run the stage that produces it."
            ) from None
        return self._parse_record(path, raw, stage, key)

    def has(self, stage: str, key: str) -> bool:
        path = self._record_path(stage, key)
        if self._loc.is_local or self._loc.protocol == "memory":
            return self._loc.fs.exists(path)
        try:  # one GET of the small record; exists() costs a HEAD and, when absent, a LIST
            fsio.read_bytes(self._loc, path)
        except FileNotFoundError:
            return False
        return True

    def read(self, stage: str, key: str) -> pa.Table:
        if not self._loc.is_local:
            # The record as this process last listed it saves a GET before the data's. A
            # listing can be stale (the shard quarantined, or re-committed under another
            # attempt, since): its data file is then gone, so read the record afresh.
            listed = _LISTED.get(self._loc.url_of(self._record_path(stage, key)))
            if listed is not None:
                with contextlib.suppress(CorruptShardError):
                    return self._read_data(stage, key, listed)
        return self._read_data(stage, key, self._read_record(stage, key))

    def _read_data(self, stage: str, key: str, record: dict) -> pa.Table:
        url = self._data_url(stage, record)
        fix = (
            f"Fix: delete the commit record {self._loc.url_of(self._record_path(stage, key))} "
            f"and re-run the stage that produced {stage}/{key}."
        )
        try:
            data = fsio.read_bytes(self._loc, f"{self._stage_dir(stage)}/{record['data']}")
        except FileNotFoundError:
            raise CorruptShardError(f"committed shard file {url} is missing. {fix}") from None
        crc = _crc_pool().submit(zlib.crc32, data)  # overlaps the decode; both drop the GIL
        try:
            table, error = pq.ParquetFile(pa.BufferReader(data)).read(), None  # no dataset layer
        except (pa.ArrowException, OSError) as e:
            table, error = None, e
        if len(data) != record["bytes"] or crc.result() != record["crc32"]:
            raise CorruptShardError(
                f"shard file {url} is corrupt: {len(data)} bytes whose checksum does not match "
                f"its commit record ({record['bytes']} bytes). {fix}"
            )
        if error is not None:
            raise CorruptShardError(f"shard file {url} is not valid Parquet ({error}). {fix}")
        self._check_owner(table, url)
        return table

    def _check_owner(self, table: pa.Table, url: str) -> None:
        meta = table.schema.metadata or {}
        found = meta.get(VERSION_KEY, b"none").decode()
        if found != str(SCHEMA_VERSION):
            raise SchemaVersionError(
                f"shard {url} has rollout schema version {found}, expected {SCHEMA_VERSION}. "
                "Fix: read it with the scalerl release that wrote it, or migrate the run "
                "(docs/ROLLOUT_SCHEMA.md lists the changes between versions)."
            )
        owner = meta.get(RUN_ID_KEY, b"").decode()
        if owner != self._run_id or (
            table.num_rows and not pc.all(pc.equal(table.column("run_id"), owner)).as_py()
        ):
            raise ForeignFileError(
                f"shard {url} holds rows of run {owner!r}, not {self._run_id!r}. {_MOVE_OUT}"
            )

    def content_damage(self, stage: str, keys: list[str] | None = None) -> dict[str, tuple]:
        """key -> (check, damage) for the committed shards of `stage` (or `keys` of them),
        each data file read whole and hashed: check is "sha256" (the record has one), "crc32"
        (an older record: only its CRC-32) or "size" (neither); damage is "" when the file
        matches, else what is wrong. A missing file is "missing" (the size check of `runs
        verify` names it)."""
        records = {r["key"]: r for r in self._records(stage)}
        todo = [records[k] for k in (records if keys is None else keys) if k in records]

        def check(record: dict) -> tuple[str, tuple]:
            path = f"{self._stage_dir(stage)}/{record['data']}"
            kind = "sha256" if record.get("sha256") else "crc32" if "crc32" in record else "size"
            sha, crc, size = hashlib.sha256(), 0, 0
            try:
                with self._loc.fs.open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        size += len(chunk)
                        if kind == "sha256":
                            sha.update(chunk)
                        elif kind == "crc32":
                            crc = zlib.crc32(chunk, crc)
            except FileNotFoundError:
                return record["key"], (kind, "missing")
            if size != record["bytes"]:
                damage = f"{size:,} bytes, its commit record says {record['bytes']:,}"
            elif kind == "sha256" and sha.hexdigest() != record["sha256"]:
                damage = "its content does not match the sha256 of its commit record"
            elif kind == "crc32" and crc != record["crc32"]:
                damage = "its content does not match the CRC-32 of its commit record"
            else:
                damage = ""
            return record["key"], (kind, damage)

        if not todo:
            return {}
        with ThreadPoolExecutor(max_workers=min(4, len(todo))) as pool:  # hashing drops the GIL
            return dict(pool.map(check, todo))

    # -- listing ---------------------------------------------------------------------------

    def stages(self) -> list[str]:
        out = []
        for info in fsio.ls(self._loc, self._root):
            name = fsio.basename(info)
            if info["type"] != "directory" or name.startswith(fsio.TMP_PREFIX):
                raise ForeignFileError(
                    f"{self._loc.url_of(info['name'])} is not a stage directory. {_MOVE_OUT}"
                )
            out.append(validate_name(name, "stage directory"))
        return sorted(out)

    def _check_layout(self, stage: str, base: str) -> None:
        """ForeignFileError for anything but data/ and commits/ in the stage directory. A
        listing of its own: every call on local disk, on object stores at most every
        LAYOUT_CHECK_S per stage and process (pollers list a stage several times a second,
        and each listing is a request)."""
        url = self._loc.url_of(base)
        if not self._loc.is_local and time.monotonic() - _LAYOUT_CHECKED.get(url, -1e9) < (
            LAYOUT_CHECK_S
        ):
            return
        for info in fsio.ls(self._loc, base):
            if fsio.basename(info) not in ("data", "commits") or info["type"] != "directory":
                raise ForeignFileError(
                    f"{self._loc.url_of(info['name'])} is not part of the shard layout "
                    f"(only data/ and commits/ belong in {stage}/). {_MOVE_OUT}"
                )
        _LAYOUT_CHECKED[url] = time.monotonic()

    def _record_infos(self, stage: str) -> list[dict]:
        base = self._stage_dir(stage)
        self._check_layout(stage, base)
        infos = []
        for info in fsio.ls(self._loc, f"{base}/commits"):
            name = fsio.basename(info)
            if name.startswith(fsio.TMP_PREFIX):
                continue  # a writer's record in flight, or an orphan
            if not name.endswith(".json") or info["type"] != "file":
                raise ForeignFileError(
                    f"{self._loc.url_of(info['name'])} is not a commit record. {_MOVE_OUT}"
                )
            infos.append({**info, "name": f"{base}/commits/{name}"})
        return infos

    def _record_paths(self, stage: str) -> list[str]:
        return [info["name"] for info in self._record_infos(stage)]

    def _records(self, stage: str) -> list[dict]:
        """Every commit record of `stage`: one listing, then only the records this process
        has not parsed yet are read (a record is written once and never changed; the cache
        entry is also keyed by the listing's size and modification time)."""
        infos = self._record_infos(stage)
        stamped = [(info["name"], (info.get("size"), fsio.mtime(info))) for info in infos]
        out: dict[str, dict] = {}
        missing = []
        for path, stamp in stamped:
            hit = _RECORDS.get((self._loc.url_of(path), stamp))
            if hit is None:
                missing.append(path)
            else:
                out[path] = hit
        raws = self._loc.fs.cat(missing) if missing else {}
        stamps = dict(stamped)
        for path, raw in raws.items():
            out[path] = record = self._parse_record(path, raw, stage, None)
            _RECORDS.put((self._loc.url_of(path), stamps[path]), record)
        for path, record in out.items():
            _LISTED.put(self._loc.url_of(path), record)
        return [out[path] for path, _ in stamped]

    def count(self, stage: str) -> int:
        """Committed shards of a stage, from one directory listing (no record is read)."""
        return len(self._record_paths(stage))

    def list(self, stage: str) -> list[ShardInfo]:
        infos = [self._info(record) for record in self._records(stage)]
        return sorted(infos, key=lambda i: (i.committed_at, i.key))

    def orphans(self, older_than: float) -> list[str]:
        """Data files no commit record points at, and temp files, last modified before
        `older_than` (epoch s). Committed data is never returned."""
        found = []
        for stage in self.stages():
            base = self._stage_dir(stage)
            referenced = {f"{base}/{record['data']}" for record in self._records(stage)}
            for sub in ("data", "commits"):
                for info in fsio.ls(self._loc, f"{base}/{sub}"):
                    name = fsio.basename(info)
                    path = f"{base}/{sub}/{name}"
                    ours = name.startswith(fsio.TMP_PREFIX) or (
                        sub == "data" and _DATA_RE.fullmatch(f"data/{name}")
                    )
                    if ours and path not in referenced and fsio.mtime(info) < older_than:
                        found.append(path)
        return found

    # -- quarantine ------------------------------------------------------------------------
    #
    # quarantine/{stage}/{key}/{attempt}/{key}.{attempt}.parquet   copy of the data file
    # quarantine/{stage}/{key}/{attempt}/commit.json               copy of the commit record
    # quarantine/{stage}/{key}/{attempt}/reason.json               written after both copies
    #
    # `attempt` is the commit's data attempt id (or a digest of an unparseable record), so the
    # same commit always lands in the same directory (idempotent) and a later, different commit
    # under a quarantined key gets its own. Order: copy data, copy record, write the reason,
    # remove the commit record (readers stop seeing the shard), remove the original data file.
    # A crash before the reason leaves the shard committed (the partial copy is overwritten by
    # the next attempt); after it, the shard is quarantined with its reason, and a repeated call
    # finishes the removal. Committed data is never removed before its copy exists.

    def quarantine(self, stage: str, key: str, reason: str, error: str, by: str) -> dict:
        record_path = self._record_path(stage, key)
        try:
            raw = fsio.read_bytes(self._loc, record_path)
        except FileNotFoundError:
            done = self._quarantined_of(stage, key)
            if not done:
                raise ShardNotFoundError(
                    f"shard {stage}/{key} of run {self._run_id!r} is neither committed nor "
                    f"quarantined (no {self._loc.url_of(record_path)}). Fix: check "
                    f"list_shards({stage!r}) and list_quarantined() for the key."
                ) from None
            doc = done[-1]
            self._remove_original(stage, doc)  # a crash between record and data removal
            return doc
        data_rel = self._data_rel_of(raw, key)
        attempt = data_rel.split(".")[-2] if data_rel else hashlib.sha256(raw).hexdigest()[:12]
        qdir = f"{self._quarantine}/{stage}/{key}/{attempt}"
        reason_path = f"{qdir}/reason.json"
        doc = self._read_reason(reason_path)
        if doc is None:
            data_copied = False
            if data_rel is not None:
                data_copied = fsio.copy_file(
                    self._loc,
                    f"{self._stage_dir(stage)}/{data_rel}",
                    f"{qdir}/{key}.{attempt}.parquet",
                )
            fsio.fault_point("quarantine.data_copied")
            fsio.write_atomic(self._loc, f"{qdir}/commit.json", raw)
            doc = {
                "format": QUARANTINE_FORMAT,
                "run_id": self._run_id,
                "stage": stage,
                "key": key,
                "reason": str(reason),
                "error": error,
                "by": by,
                "quarantined_at": time.time(),
                "original_record": self._loc.url_of(record_path),
                "original_data": (
                    self._loc.url_of(f"{self._stage_dir(stage)}/{data_rel}") if data_rel else None
                ),
                "data_copy": self._loc.url_of(f"{qdir}/{key}.{attempt}.parquet")
                if data_copied
                else None,
                "record_copy": self._loc.url_of(f"{qdir}/commit.json"),
            }
            fsio.write_atomic(self._loc, reason_path, json.dumps(doc, indent=1).encode())
        fsio.fault_point("quarantine.reason_written")
        with contextlib.suppress(FileNotFoundError):  # a racing quarantiner removed it
            self._loc.fs.rm_file(record_path)
        fsio.fault_point("quarantine.record_removed")
        self._remove_original(stage, doc)
        return doc

    def _data_rel_of(self, raw: bytes, key: str) -> str | None:
        """The record's data file (relative to the stage dir) if the record names one of ours."""
        try:
            rel = str(json.loads(raw).get("data"))
        except (ValueError, AttributeError):
            return None
        match = _DATA_RE.fullmatch(rel)
        return rel if match and match.group(1) == key else None

    def _remove_original(self, stage: str, doc: dict) -> None:
        """Delete the original data file of a quarantined shard once its copy exists (and
        only if no commit record points at it again)."""
        url = doc.get("original_data")
        if not url or not doc.get("data_copy"):
            return  # no copy: leave the file for a person (clean_orphans treats it as orphan)
        rel = "data/" + url.rsplit("/", 1)[-1]
        match = _DATA_RE.fullmatch(rel)
        if not match or match.group(1) != doc.get("key"):
            return
        path = f"{self._stage_dir(stage)}/{rel}"
        with contextlib.suppress(FileNotFoundError):
            self._loc.fs.rm_file(path)

    def _read_reason(self, path: str) -> dict | None:
        try:
            doc = json.loads(fsio.read_bytes(self._loc, path))
        except FileNotFoundError:
            return None
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or doc.get("format") != QUARANTINE_FORMAT:
            raise ForeignFileError(
                f"{self._loc.url_of(path)} is not a quarantine record of the run store. {_MOVE_OUT}"
            )
        return doc

    def _quarantine_files(self, stage: str | None) -> list[tuple[str, str, str, str]]:
        """(stage, key, attempt, file name) of every file in the quarantine area (of `stage`)."""
        base = self._quarantine if stage is None else f"{self._quarantine}/{stage}"
        prefix = self._quarantine.rstrip("/") + "/"
        try:
            paths = self._loc.fs.find(base)
        except FileNotFoundError:
            return []
        out = []
        for path in paths:
            parts = path[len(prefix) :].split("/") if path.startswith(prefix) else []
            if len(parts) == 4 and _ATTEMPT_RE.fullmatch(parts[2]):
                out.append((parts[0], parts[1], parts[2], parts[3]))
        return out

    def quarantined(self, stage: str | None = None) -> list[dict]:
        """Reason records of quarantined shards (of `stage`, or all), oldest first."""
        if stage is not None:
            validate_name(stage, "stage name")
        paths = [
            f"{self._quarantine}/{s}/{k}/{a}/{name}"
            for s, k, a, name in self._quarantine_files(stage)
            if name == "reason.json"
        ]
        docs = [d for d in (self._read_reason(p) for p in paths) if d is not None]
        return sorted(docs, key=lambda d: (d["quarantined_at"], d["stage"], d["key"]))

    def quarantine_problems(self) -> list[str]:
        """Quarantine entries whose reason record lacks a copy it names (commit record, data)."""
        files: dict[tuple[str, str, str], set[str]] = {}
        for s, k, a, name in self._quarantine_files(None):
            files.setdefault((s, k, a), set()).add(name)
        problems = []
        for (s, k, a), names in sorted(files.items()):
            if "reason.json" not in names:
                continue  # in progress or interrupted before the reason: the shard is committed
            doc = self._read_reason(f"{self._quarantine}/{s}/{k}/{a}/reason.json")
            missing = [] if "commit.json" in names else ["commit.json"]
            if doc.get("data_copy") and f"{k}.{a}.parquet" not in names:
                missing.append(f"{k}.{a}.parquet")
            if missing:
                problems.append(f"quarantined {s}/{k} lacks its copy of {', '.join(missing)}")
        return problems

    def _quarantined_of(self, stage: str, key: str) -> list[dict]:
        return [d for d in self.quarantined(stage) if d["key"] == key]

    def quarantined_keys(self, stage: str | None) -> set[str]:
        """Keys (of `stage`, or of any) with a reason record (one listing, no record read)."""
        if stage is not None:
            validate_name(stage, "stage name")
        return {k for _, k, _, name in self._quarantine_files(stage) if name == "reason.json"}

    def used_keys(self, stage: str) -> set[str]:
        """Keys committed or ever (even partly) quarantined under `stage`."""
        validate_name(stage, "stage name")
        quarantined = {k for _, k, _, _ in self._quarantine_files(stage)}
        committed = {p.rsplit("/", 1)[-1][: -len(".json")] for p in self._record_paths(stage)}
        return quarantined | committed
