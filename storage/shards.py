"""Rollout shards under {run}/shards/{stage}/ and their commit protocol.

    shards/{stage}/data/{key}.{attempt}.parquet   data, one file per write attempt
    shards/{stage}/commits/{key}.json             commit record, written last, exclusively

A writer serializes the table once (Parquet zstd, schema version + run id in the key-value
metadata), uploads it under a fresh attempt name, then creates the commit record with an
exclusive create. Readers list and open commit records only, so they never see a partial or
uncommitted file; a dead writer leaves at most an unreferenced data file (an orphan, removed
by Run.clean_orphans). The record carries rows, bytes and the CRC-32 of the data file; reads
verify size and checksum, so a truncated or altered file is a CorruptShardError rather than
wrong data (CRC-32 runs at several GB/s; a cryptographic digest cost 15% of a read).

The hot path does no extra round trip: the data goes up, then the exclusive create of the
record decides. Only when the key is already committed (a retry) is the existing shard read
back and compared as a table: equal is a no-op that returns the existing ShardInfo, anything
else is CommitConflictError, and the losing attempt's data file is deleted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import time
import uuid
import zlib
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


def _write_local(path: str, table: pa.Table) -> tuple[int, int]:
    """Stream Parquet straight to disk (no in-memory copy of the file); return (bytes, crc32).
    Re-reading the fresh file from the page cache for the checksum is cheaper than building
    the whole file in memory first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with pq.ParquetWriter(path, table.schema, **PARQUET_OPTIONS) as writer:
        writer.write_table(table)
        fsio.fault_point("shard.data.partial")  # pages are on disk, the footer is not
    with open(path, "rb") as f:
        data = f.read()
    return len(data), zlib.crc32(data)


@functools.cache
def _crc_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage-crc")


class Shards:
    """Shard operations of one run; Run delegates to this."""

    def __init__(self, loc: Location, run_root: str, run_id: str) -> None:
        self._loc, self._root, self._run_id = loc, run_root + "/shards", run_id

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
                size, crc = _write_local(data_path, table)
            else:
                sink = pa.BufferOutputStream()
                pq.write_table(table, sink, **PARQUET_OPTIONS)
                data = sink.getvalue()
                checksum = _crc_pool().submit(zlib.crc32, data)  # overlaps the upload
                fsio.put_unreferenced(self._loc, data_path, data.to_pybytes(), "shard.data")
                size, crc = data.size, checksum.result()
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
        return self._loc.fs.exists(self._record_path(stage, key))

    def read(self, stage: str, key: str) -> pa.Table:
        record = self._read_record(stage, key)
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
            table, error = pq.read_table(pa.BufferReader(data)), None
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

    def _record_paths(self, stage: str) -> list[str]:
        base = self._stage_dir(stage)
        for info in fsio.ls(self._loc, base):
            if fsio.basename(info) not in ("data", "commits") or info["type"] != "directory":
                raise ForeignFileError(
                    f"{self._loc.url_of(info['name'])} is not part of the shard layout "
                    f"(only data/ and commits/ belong in {stage}/). {_MOVE_OUT}"
                )
        paths = []
        for info in fsio.ls(self._loc, f"{base}/commits"):
            name = fsio.basename(info)
            if name.startswith(fsio.TMP_PREFIX):
                continue  # a writer's record in flight, or an orphan
            if not name.endswith(".json") or info["type"] != "file":
                raise ForeignFileError(
                    f"{self._loc.url_of(info['name'])} is not a commit record. {_MOVE_OUT}"
                )
            paths.append(f"{base}/commits/{name}")
        return paths

    def _records(self, stage: str) -> list[dict]:
        paths = self._record_paths(stage)
        raws = self._loc.fs.cat(paths) if paths else {}
        return [self._parse_record(path, raw, stage, None) for path, raw in raws.items()]

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
