"""The run store: every durable artifact of a ScaleRL run, under one root URL.

    from storage import open_store
    store = open_store("s3://bucket/runs")           # or "./runs", "memory://t"
    run = store.run("run-1", create=True)
    run.commit_shard("raw", "gen0-000001", table)    # atomic, idempotent
    for info in run.list_shards("raw"): table = run.read_shard("raw", info.key)

Layout under {root}/{run_id}/ (every name is checked against [A-Za-z0-9._-]):

    .scalerl-run.json                      marks the directory as a run (written on create)
    run.json                               config snapshot (write_config)
    status.json                            lifecycle: running / finished / exhausted / failed
    markers/{name}.json                    progress facts shared between processes
    plots/{name}.png                       rendered figures (compute curve, lengths, staleness)
    prompts/{split}.parquet                PROMPT_SCHEMA (write_prompts)
    shards/{stage}/data/{key}.{attempt}.parquet   rollout data (storage/shards.py)
    shards/{stage}/commits/{key}.json      commit records; only these make a shard visible
    weights/v{N}/... + _MANIFEST.json      policy weights; weights/LATEST points at newest
    checkpoints/step-{N}/... + _MANIFEST.json    trainer checkpoints (+ checkpoints/LATEST)
    quarantine/checkpoints/step-{N}/q-{digest}/  a damaged checkpoint taken out of use
                                           (quarantine_checkpoint): files/, _MANIFEST.json,
                                           reason.json (storage/dirs.py)
    curriculum/v{N}.json                   curriculum state, one file per version
    metrics/{name}/part-{time_ns}-{id}.parquet   appended metric rows; read_metrics keeps
                                           the last written row per step (trainer) or
                                           version (eval), per (version, set)
                                           (eval_sets): METRICS_KEYS
    quarantine/{stage}/{key}/{attempt}/    a shard taken out of use (quarantine_shard): copies
                                           of its data and commit record, reason.json
    .tmp-*                                 in-flight local writes; orphans if old

Files are written so that a reader sees all of one or none of it (storage/fsio.py). Files
the store did not write raise ForeignFileError when they sit where it looks. A writer killed
mid-way leaves only orphans; clean_orphans() deletes those older than a threshold.

Every method retries an endpoint that answered before and stops answering (storage/retry.py:
up to SCALERL_STORAGE_RETRY_S, default 300 s); an endpoint that never answered fails at once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import fsio, lease
from storage.dirs import ManifestDirs
from storage.errors import (
    BucketNotFoundError,
    CommitConflictError,
    ConfigMismatchError,
    ForeignFileError,
    InvalidInputError,
    NotCommittedError,
    RunNotFoundError,
    StoreError,
)
from storage.fsio import guarded
from storage.paths import Location, open_location, validate_name
from storage.retry import retrying
from storage.schema import PROMPT_SCHEMA, check_columns
from storage.shards import ShardInfo, Shards

RUN_MARKER = ".scalerl-run.json"
TRACKING = "tracking"  # the config section a resume may change (experiment trackers only)
_CURRICULUM_RE = re.compile(r"v(0|[1-9][0-9]*)\.json")
_PART_RE = re.compile(r"part-[0-9]{19}-[0-9a-f]{8}\.parquet")
# The metrics streams with one row per key: a step redone after a resume from an older
# checkpoint, a version evaluated again, or a second writer appends the key again, and
# read_metrics keeps the last row written. Columns are tried in order, the first non-null
# value per row is the key (eval rows carry version; rows without it fall back to step).
METRICS_KEYS: dict[str, tuple[str, ...]] = {
    "trainer": ("step",),
    "eval": ("version", "step"),
    "eval_sets": ("key",),  # one row per (version, set): key {set}-v{version:06d}
    "weights": ("version",),  # the publish ledger (runtime/transports/): one row per version
}


def open_store(url: str = "./runs", *, storage_options: dict | None = None) -> RunStore:
    """Open the run store at `url` (local path, file://, s3://bucket/prefix, memory://)."""
    return RunStore(open_location(url, storage_options))


def config_differences(saved: dict, given: dict, limit: int = 8) -> list[str]:
    """Dotted paths whose values differ between two config dicts, as 'path: X in run.json, Y
    given' (at most `limit`, then how many more)."""
    out: list[str] = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            out.append(f"{path}: {json.dumps(a)} in run.json, {json.dumps(b)} given")

    walk(saved, given, "")
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])


def _json_bytes(value: object, what: str, *, compact: bool = False) -> bytes:
    """Sorted-key JSON; `compact` for large documents (one line: json's C encoder only runs
    without indent, and the curriculum state is rewritten for every shard)."""
    try:
        indent, separators = (None, (",", ":")) if compact else (1, None)
        return json.dumps(
            value, sort_keys=True, indent=indent, separators=separators, allow_nan=False
        ).encode()
    except (TypeError, ValueError) as e:
        raise InvalidInputError(
            f"{what} is not JSON-serializable ({e}). Fix: pass plain dicts, lists, strings, "
            "finite numbers, booleans and None (e.g. config.model_dump(mode='json'))."
        ) from None


class DamagedCurriculumError(StoreError):
    """A committed curriculum file (curriculum/v{N}.json) is truncated, not JSON, or lacks the
    keys of a curriculum state (damaged after its commit). `version`, `damage`: which, and what
    is wrong with it."""

    def __init__(self, message: str, version: int = -1, damage: str = "") -> None:
        super().__init__(message)
        self.version, self.damage = version, damage


_log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # damaged curriculum files already warned about by this process


def _state_damage(state: object) -> str:
    """What keeps `state` from being a curriculum state; '' when it is one."""
    if not isinstance(state, dict):
        return "no state object"
    if not isinstance(state.get("applied"), list):
        return "its state has no applied list"
    if not isinstance(state.get("sampler"), dict):
        return "its state has no sampler object"
    return ""


def _parse_curriculum(raw: bytes, version: int) -> tuple[dict | None, str]:
    """(state, '') from the bytes of curriculum/v{version}.json, or (None, what is wrong)."""
    try:
        doc = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError is one
        return None, f"not JSON: {str(e).splitlines()[0][:120]}"
    if not isinstance(doc, dict):
        return None, f"a JSON {type(doc).__name__}, not an object"
    if doc.get("version") != version:
        return None, f"its version is {doc.get('version')!r}, not {version}"
    damage = _state_damage(doc.get("state"))
    return (None, damage) if damage else (doc["state"], "")


def _stream_sha256(fs, path: str) -> tuple[str, int] | None:
    """(sha256 hex, bytes) of a stored file, read in 4 MiB chunks; None when it is missing."""
    digest, size = hashlib.sha256(), 0
    try:
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest(), size


def latest_metrics(name: str, table: pa.Table) -> pa.Table:
    """`table` (rows of metrics stream `name` in append order) with one row per key of
    METRICS_KEYS[name], the last one, sorted by key; rows with a null key follow, all kept.
    A stream without a key, or a table without the key columns, is returned as it is."""
    present = [c for c in METRICS_KEYS.get(name, ()) if c in table.column_names]
    if not present or table.num_rows == 0:
        return table
    key = table.column(present[0])
    for other in present[1:]:
        try:
            key = pc.coalesce(key, table.column(other).cast(key.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            break  # a fallback column of another kind: the first column alone is the key
    index = pa.array(np.arange(table.num_rows, dtype=np.int64))
    keyed = pa.table({"key": key, "row": index})
    valid = pc.is_valid(key)
    last = (
        keyed.filter(valid)
        .group_by("key", use_threads=False)
        .aggregate([("row", "max")])
        .sort_by("key")
        .column("row_max")
    )
    if last.length() == table.num_rows:
        return table if _ascending(key) else table.take(last)
    nulls = keyed.filter(pc.invert(valid)).column("row")
    return table.take(pa.chunked_array([*last.chunks, *nulls.chunks], type=pa.int64()))


def _ascending(key: pa.ChunkedArray) -> bool:
    """No null and every key above the one before it (the common case: nothing redone)."""
    if key.null_count or len(key) < 2:
        return not key.null_count
    k = key.combine_chunks()
    return bool(pc.all(pc.greater(k[1:], k[:-1])).as_py())


def _writes(method):
    """A write of the run's writer: refused (LeaseLostError) once another writer took the run's
    lease over. Only processes that write under a lease check (storage/lease.py: the run's flow
    process and its children inherit it); readers and tools never do."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self._lease is not None:
            self._check_lease()  # its own retry loop: an outage is waited out, as for writes
        return method(self, *args, **kwargs)

    return wrapper


class RunStore:
    """All runs under one root URL."""

    def __init__(self, loc: Location) -> None:
        self._loc = loc
        self.url = loc.url_of(loc.root)

    @guarded  # a probe: fails at once, never waits out an outage
    def check(self) -> None:
        """Probe the storage: raise StorageUnreachableError, StorageCredentialsError or
        BucketNotFoundError (naming the endpoint, never the secret) if it cannot be used."""
        if self._loc.protocol != "s3":
            fsio.ls(self._loc, self._loc.root)
            return
        bucket = self._loc.root.split("/", 1)[0]
        try:
            self._loc.fs.call_s3("head_bucket", Bucket=bucket)  # one request, any bucket size
        except FileNotFoundError:
            raise BucketNotFoundError(
                f"bucket {bucket!r} does not exist at {self._loc.endpoint}. Fix: create it "
                "(e.g. `aws s3 mb s3://BUCKET`) or correct the storage URL."
            ) from None

    @retrying
    def run(self, run_id: str, *, create: bool = False) -> Run:
        path = self._loc.join(validate_name(run_id, "run id"))
        if not self._loc.fs.exists(f"{path}/{RUN_MARKER}"):
            if not create:
                raise RunNotFoundError(
                    f"run {run_id!r} does not exist under {self.url}. Fix: check the id "
                    f"(existing: {self.list_runs()[:10]}) or pass create=True."
                )
            marker = _json_bytes({"run_id": run_id, "created_at": time.time()}, "marker")
            fsio.create_exclusive(self._loc, f"{path}/{RUN_MARKER}", marker)
        return Run(self._loc, run_id)

    @retrying
    def list_runs(self) -> list[str]:
        names = [fsio.basename(i) for i in fsio.ls(self._loc, self._loc.root)]
        names = [n for n in names if not n.startswith(".")]
        return sorted(n for n in names if self._loc.fs.exists(f"{self._loc.join(n)}/{RUN_MARKER}"))


class Run:
    """One run's directory. Obtain it from RunStore.run(run_id)."""

    def __init__(self, loc: Location, run_id: str) -> None:
        self._loc, self.run_id = loc, run_id
        self._root = loc.join(run_id)
        self.url = loc.url_of(self._root)
        self._shards = Shards(loc, self._root, run_id)
        self._weights = ManifestDirs(loc, f"{self._root}/weights", "v", "weights")
        self._ckpts = ManifestDirs(loc, f"{self._root}/checkpoints", "step-", "checkpoint")
        self._lease = lease.inherited(loc, self._root, run_id)  # None unless we write under one

    def __repr__(self) -> str:
        return f"Run({self.url!r})"

    # -- the writer's lease (storage/lease.py) -----------------------------------------------

    def acquire_lease(self, holder: dict | None = None) -> lease.Lease:
        """Become the run's one writer (LeaseHeldError names a live holder); this Run object
        writes under the lease from now on. Export lease.env() as $SCALERL_LEASE so that the
        writer's children do too."""
        self._lease = lease.acquire(self._loc, self._root, self.run_id, holder)
        return self._lease

    @retrying
    def _check_lease(self) -> None:
        self._lease.check()

    @retrying
    def lease_holder(self) -> dict | None:
        """The newest lease document (host, pid, flow run, heartbeat, expiry), or None."""
        found = lease.newest(self._loc, self._root)
        return None if found is None else found[1]

    # -- config and prompts ----------------------------------------------------------------

    @retrying
    def write_config(self, config: dict, *, overwrite: bool = False) -> None:
        """Write run.json. Rewriting identical content is a no-op; different content raises
        ConfigMismatchError (naming the differing fields) unless overwrite=True."""
        if not isinstance(config, dict):
            raise InvalidInputError(
                f"config must be a dict, got {type(config).__name__}. "
                "Fix: pass config.model_dump(mode='json')."
            )
        data, path = _json_bytes(config, "config"), f"{self._root}/run.json"
        if overwrite:
            fsio.write_atomic(self._loc, path, data)
        elif not fsio.create_exclusive(self._loc, path, data):
            saved = self.read_config()
            self._refuse_other_config(saved, json.loads(data))
            if saved.get(TRACKING) != config.get(TRACKING):  # a tracker added on resume
                fsio.write_atomic(self._loc, path, data)

    @retrying
    def check_config(self, config: dict) -> None:
        """Raise ConfigMismatchError (naming the differing fields) when run.json exists and holds
        another config; nothing is written. What `scalerl run --run-id` checks up front."""
        if self._loc.fs.exists(f"{self._root}/run.json"):
            self._refuse_other_config(self.read_config(), json.loads(_json_bytes(config, "config")))

    def _refuse_other_config(self, saved: dict, given: dict) -> None:
        """The trackers (the `tracking` section) may differ: they change what the run is
        mirrored to, not what it computes, so a resume may add or move one."""
        saved, given = dict(saved), dict(given)
        saved.pop(TRACKING, None), given.pop(TRACKING, None)
        if (saved.get("storage") or {}).get("run_id", "") is None:  # written before ids were
            saved["storage"] = {**saved["storage"], "run_id": self.run_id}  # kept in the snapshot
        if saved != given:
            raise ConfigMismatchError(
                f"run {self.run_id} was started with another config "
                f"({self._loc.url_of(f'{self._root}/run.json')}); differing: "
                f"{'; '.join(config_differences(saved, given))}. Fix: resume it with its own "
                f"config (`scalerl resume {self.run_id}`, or the scalerl-resume deployment with "
                "only the run id), or start a new run id."
            )

    @retrying
    def created_at(self) -> float | None:
        """When the run was created (its marker's time, seconds since the epoch), or None."""
        doc = self._read_doc(f"{self._root}/{RUN_MARKER}") or {}
        return doc.get("created_at")

    @retrying
    def read_config(self) -> dict:
        path = f"{self._root}/run.json"
        try:
            return json.loads(fsio.read_bytes(self._loc, path))
        except FileNotFoundError:
            raise NotCommittedError(
                f"{self._loc.url_of(path)} does not exist: this run was never prepared. Fix: "
                "start it with `scalerl run` (or prepare_run), or pass the id of a prepared run."
            ) from None
        except ValueError:
            raise ForeignFileError(
                f"{self._loc.url_of(path)} is not valid JSON (damaged or not written by "
                "scalerl). Fix: restore run.json from a backup or a copy of the run's config "
                "(scalerl config show --preset ... prints one), or move the run aside."
            ) from None

    def _replace_doc(self, path: str, doc: dict, what: str) -> None:
        """Atomically replace a small JSON document (last writer wins)."""
        if not isinstance(doc, dict):
            raise InvalidInputError(
                f"{what} must be a dict, got {type(doc).__name__}. Fix: pass a dict."
            )
        fsio.write_atomic(self._loc, path, _json_bytes(doc, what))

    def _read_doc(self, path: str) -> dict | None:
        """A JSON document written by _replace_doc, or None before the first write."""
        try:
            return json.loads(fsio.read_bytes(self._loc, path))
        except FileNotFoundError:
            return None
        except ValueError:
            raise ForeignFileError(
                f"{self._loc.url_of(path)} is not valid JSON. Fix: move it out of the run directory."
            ) from None

    @_writes
    @retrying
    def write_status(self, status: dict) -> None:
        """Replace status.json: the run's lifecycle as every process sees it (e.g. state
        running / finished / exhausted / failed, reason, step). Atomic; last writer wins."""
        self._replace_doc(f"{self._root}/status.json", status, "status")

    @retrying
    def read_status(self) -> dict | None:
        """The last status written, or None before the first one."""
        return self._read_doc(f"{self._root}/status.json")

    @_writes
    @retrying
    def write_marker(self, name: str, doc: dict) -> None:
        """Replace markers/{name}.json: small progress facts one process publishes for others
        (e.g. how far the trainer has read). Atomic; last writer wins."""
        self._replace_doc(
            f"{self._root}/markers/{validate_name(name, 'marker name')}.json", doc, "marker"
        )

    @retrying
    def read_marker(self, name: str) -> dict | None:
        return self._read_doc(f"{self._root}/markers/{validate_name(name, 'marker name')}.json")

    @retrying
    def read_markers(self, prefix: str) -> dict[str, dict]:
        """Every marker whose name starts with `prefix`: name -> doc (one listing, one batched
        read). Markers that are not JSON objects are left out."""
        base = f"{self._root}/markers"
        try:
            infos = fsio.ls(self._loc, base)
        except FileNotFoundError:
            return {}
        paths = [
            info["name"]
            for info in infos
            if info["type"] == "file"
            and (name := fsio.basename(info)).startswith(prefix)
            and name.endswith(".json")
        ]
        found = self._loc.fs.cat(paths, on_error="omit") if paths else {}
        out = {}
        for path, raw in found.items():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out[path.rsplit("/", 1)[-1][: -len(".json")]] = doc
        return out

    @_writes
    @retrying
    def delete_marker(self, name: str) -> None:
        path = f"{self._root}/markers/{validate_name(name, 'marker name')}.json"
        with contextlib.suppress(FileNotFoundError):
            self._loc.fs.rm_file(path)

    @retrying
    def save_plot(self, name: str, png: bytes) -> str:
        """Write plots/{name}.png atomically (replacing an older rendering); returns its URL."""
        path = f"{self._root}/plots/{validate_name(name, 'plot name')}.png"
        fsio.write_atomic(self._loc, path, png)
        return self._loc.url_of(path)

    @retrying
    def write_prompts(self, split: str, table: pa.Table, *, overwrite: bool = False) -> None:
        """Write prompts/{split}.parquet (PROMPT_SCHEMA columns, unique prompt_id)."""
        path = f"{self._root}/prompts/{validate_name(split, 'split name')}.parquet"
        check_columns(table, PROMPT_SCHEMA, f"prompt table {split!r}", InvalidInputError)
        if table.num_rows != len(table.column("prompt_id").unique()):
            raise InvalidInputError(
                f"prompt table {split!r} has duplicate prompt_id values. Fix: give every "
                "prompt a unique id (e.g. a hash of dataset name and row index)."
            )
        if not overwrite and self._loc.fs.exists(path):
            old = self.read_prompts(split)
            new = table.replace_schema_metadata(None)
            if old.schema.names == new.schema.names and old.cast(new.schema).equals(new):
                return
            raise CommitConflictError(
                f"{self._loc.url_of(path)} already holds different prompts. Fix: use a new "
                "split name or run id, or pass overwrite=True."
            )
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(None), sink, compression="zstd")
        fsio.write_atomic(self._loc, path, sink.getvalue().to_pybytes())

    @retrying
    def read_prompts(self, split: str) -> pa.Table:
        path = f"{self._root}/prompts/{validate_name(split, 'split name')}.parquet"
        try:
            return pq.read_table(pa.BufferReader(fsio.read_bytes(self._loc, path)))
        except FileNotFoundError:
            raise NotCommittedError(
                f"prompt split {split!r} does not exist at {self._loc.url_of(path)}. "
                "Fix: write_prompts() first."
            ) from None

    # -- shards ----------------------------------------------------------------------------

    @_writes
    @retrying
    def commit_shard(self, stage: str, key: str, table: pa.Table) -> ShardInfo:
        """Commit a rollout table as shard `key` of `stage` (see storage/shards.py)."""
        return self._shards.commit(stage, key, table)

    @retrying
    def list_shards(self, stage: str) -> list[ShardInfo]:
        """Committed shards of `stage`, in commit order."""
        return self._shards.list(stage)

    @retrying
    def count_shards(self, stage: str) -> int:
        """How many shards of `stage` are committed (cheap: one listing, no record read)."""
        return self._shards.count(validate_name(stage, "stage"))

    @retrying
    def has_shard(self, stage: str, key: str) -> bool:
        return self._shards.has(stage, key)

    @retrying
    def read_shard(self, stage: str, key: str) -> pa.Table:
        return self._shards.read(stage, key)

    @retrying
    def shard_urls(self, stage: str) -> list[str]:
        """Committed data files of `stage` (full URLs) for DuckDB, polars, pyarrow.dataset."""
        return [info.url for info in self._shards.list(stage)]

    @retrying
    def stages(self) -> list[str]:
        return self._shards.stages()

    # -- quarantine ------------------------------------------------------------------------

    @_writes
    @retrying
    def quarantine_shard(
        self, stage: str, key: str, reason: str | BaseException, *, by: str = ""
    ) -> dict:
        """Take committed shard `stage/key` out of use: copy its data file and commit record to
        quarantine/{stage}/{key}/{attempt}/, write reason.json (stage, key, reason, error type,
        time, original and copy URLs, `by`: who found it), then remove the commit record, so
        readers and list_shards stop seeing it, and the original data file. Returns the reason
        record. `reason` may be the exception that condemned the shard.

        Crash-safe and idempotent: until the reason is written the shard stays committed; after
        it, a repeated call finishes the job and returns the first reason record. Nothing is
        deleted before its copy exists. ShardNotFoundError if the key is neither committed nor
        quarantined."""
        error = type(reason).__name__ if isinstance(reason, BaseException) else ""
        return self._shards.quarantine(stage, key, str(reason), error, by)

    @retrying
    def list_quarantined(self, stage: str | None = None) -> list[dict]:
        """Reason records of every quarantined shard (of `stage`), oldest first."""
        return self._shards.quarantined(stage)

    @retrying
    def quarantined_keys(self, stage: str | None = None) -> set[str]:
        """Keys quarantined under `stage` (or any stage): one listing, no record read."""
        return self._shards.quarantined_keys(stage)

    @retrying
    def quarantine_problems(self) -> list[str]:
        """Quarantine entries that miss a copy their reason record names (empty when sound)."""
        return self._shards.quarantine_problems()

    @retrying
    def used_shard_keys(self, stage: str) -> set[str]:
        """Keys committed or quarantined (even partly) under `stage`: a writer numbering its
        shards must never reuse one of them."""
        return self._shards.used_keys(stage)

    # -- weights and checkpoints -----------------------------------------------------------

    @property
    def is_local(self) -> bool:
        """Whether the run lives on a local filesystem (not object storage)."""
        return self._loc.is_local

    @_writes
    @retrying
    def publish_weights(
        self, version: int, local_dir: str | os.PathLike, *, overwrite: bool = False
    ) -> None:
        self._weights.publish(version, local_dir, overwrite=overwrite)

    @retrying
    def latest_weights_version(self) -> int | None:
        return self._weights.latest_hint()

    @retrying
    def has_weights(self, version: int) -> bool:
        """Whether weights `version` are committed (one small read; no listing)."""
        return self._weights.has(version)

    @retrying
    def list_weight_versions(self) -> list[int]:
        return self._weights.list()

    @retrying
    def download_weights(
        self,
        version: int,
        local_dir: str | os.PathLike,
        *,
        checksum: bool = False,
        files: list[str] | None = None,
    ) -> Path:
        """Weights `version` into local_dir (only the paths in `files`, if given), every file's
        size checked (and with checksum=True its sha256 against the manifest:
        DamagedEntryError names a damaged file)."""
        return self._weights.download(version, local_dir, files=files, checksum=checksum)

    @retrying
    def weights_files(self, version: int) -> list[str]:
        """The paths weights `version` holds, from its manifest."""
        return self._weights.files(version)

    @retrying
    def weights_url(self, version: int) -> str:
        return self._weights.url(version)

    @_writes
    @retrying
    def delete_weights(self, version: int) -> int:
        """Delete weights `version` for good (retention; never the newest); returns the bytes
        its manifest listed, 0 when it was not committed."""
        return self._weights.remove(version)

    @retrying
    def weights_pointer(self) -> int | None:
        """The version weights/LATEST names (committed or not), None without one."""
        return self._weights._pointer()

    @retrying
    def checkpoint_pointer(self) -> int | None:
        """The step checkpoints/LATEST names (committed or not), None without one."""
        return self._ckpts._pointer()

    @retrying
    def weights_bytes(self, versions: list[int]) -> dict[int, int]:
        return self._weights.entry_bytes(versions)

    @_writes
    @retrying
    def delete_checkpoint(self, step: int) -> int:
        """Delete checkpoint `step` for good (retention; never the newest); returns its bytes."""
        return self._ckpts.remove(step)

    @retrying
    def checkpoint_bytes(self, steps: list[int]) -> dict[int, int]:
        return self._ckpts.entry_bytes(steps)

    @_writes
    @retrying
    def save_checkpoint(
        self,
        step: int,
        local_dir: str | os.PathLike,
        *,
        overwrite: bool = False,
        extra: list[dict] | None = None,
    ) -> None:
        """Commit local_dir as checkpoint `step`; extra: entries of files other trainer nodes
        uploaded into it (upload_checkpoint_part), listed in its manifest too."""
        self._ckpts.publish(step, local_dir, overwrite=overwrite, extra=extra)

    @_writes
    @retrying
    def withdraw_checkpoint(self, step: int) -> None:
        """Take checkpoint `step` out of use (manifest removed) before it is written again in
        parts; the previous checkpoint is what a resume then uses."""
        self._ckpts.withdraw(step)

    @_writes
    @retrying
    def upload_checkpoint_part(self, step: int, local_dir: str | os.PathLike) -> list[dict]:
        """Upload a trainer node's files into checkpoint `step` (not committed: the node with
        rank 0 commits it with save_checkpoint(extra=...)); returns their manifest entries."""
        return self._ckpts.upload_part(step, local_dir)

    @retrying
    def latest_checkpoint_step(self) -> int | None:
        steps = self._ckpts.list()  # resumption is rare: trust the listing, not the pointer
        return steps[-1] if steps else None

    @retrying
    def load_checkpoint(
        self,
        step: int,
        local_dir: str | os.PathLike,
        *,
        files: list[str] | None = None,
        checksum: bool = False,
    ) -> Path:
        """Download checkpoint `step` (only `files`, manifest paths, if given), checking sizes
        (and sha256 with checksum=True). DamagedEntryError (storage.dirs) when a file is
        missing or does not match the unchanged manifest."""
        return self._ckpts.download(step, local_dir, files=files, checksum=checksum)

    @retrying
    def list_checkpoints(self) -> list[int]:
        return self._ckpts.list()

    @retrying
    def checkpoint_damage(self, steps: list[int] | None = None) -> dict[int, list[str] | None]:
        """For each checkpoint step (default: every committed one): [] when its files are all
        there with their manifest's sizes, else one string per missing or wrong-sized file;
        None when it is not committed. One batched manifest read and one listing; no hashing."""
        return self._ckpts.damage_many(self._ckpts.list() if steps is None else steps)

    @retrying
    def weights_damage(self, versions: list[int]) -> dict[int, list[str] | None]:
        """checkpoint_damage for weight versions (None: the version's manifest is missing)."""
        return self._weights.damage_many(versions)

    @retrying
    def content_damage(
        self, kind: str, numbers: list[int]
    ) -> dict[int, tuple[int, int, list[str]]]:
        """`runs verify`'s content check of committed checkpoints (kind "checkpoint") or weight
        versions ("weights"): every file of each manifest read whole and hashed against the
        manifest's sha256. number -> (files hashed, bytes hashed, one string per file whose
        content does not match); a file missing or of another size is left to the size check
        (checkpoint_damage / weights_damage), an entry without a manifest left out."""
        dirs = self._ckpts if kind == "checkpoint" else self._weights
        out: dict[int, tuple[int, int, list[str]]] = {}
        for n in numbers:
            manifest = dirs._manifest(n)
            if manifest is None:
                continue
            dirs._check_paths(n, manifest)  # no path outside the entry is ever opened
            files = hashed = 0
            damage: list[str] = []
            for entry in manifest.get("files", []):
                if not entry.get("sha256"):
                    continue
                found = _stream_sha256(self._loc.fs, f"{dirs.path(n)}/{entry['path']}")
                if found is None or found[1] != entry["bytes"]:
                    continue  # missing or resized: the size check names it
                files, hashed = files + 1, hashed + found[1]
                if found[0] != entry["sha256"]:
                    damage.append(
                        f"{entry['path']} does not match its manifest's sha256 (same size, "
                        f"{entry['bytes']:,} bytes)"
                    )
            out[n] = (files, hashed, damage)
        return out

    @retrying
    def shard_content_damage(self, stage: str) -> dict[str, tuple[str, str]]:
        """`runs verify`'s content check of every committed shard of `stage` (its data file
        read whole): key -> (check, damage), check "sha256", or "crc32" for a record written
        before records carried a sha256; damage "" when intact (storage/shards.py)."""
        return self._shards.content_damage(validate_name(stage, "stage"))

    def damage_message(self, kind: str, number: int, damage: list[str]) -> str:
        """The DamagedEntryError text for `damage` of checkpoint / weights `number`."""
        dirs = self._ckpts if kind == "checkpoint" else self._weights
        return dirs.damage_message(number, damage)

    @retrying
    def quarantine_checkpoint(
        self, step: int, reason: str | BaseException, *, by: str = "", **extra
    ) -> dict:
        """Take committed checkpoint `step` out of use (damaged, or it fails to load): copy its
        files and manifest to quarantine/checkpoints/step-{step}/q-{digest}/, write reason.json
        (reason, error type, by, time, original and copy URLs, files copied / missing, and
        `extra`), then remove its manifest (latest_checkpoint_step stops seeing it) and the
        originals that were copied. Nothing is deleted before its copy exists; a repeated call
        finishes the job and returns the first reason record. NotCommittedError when the step
        is neither committed nor quarantined."""
        error = type(reason).__name__ if isinstance(reason, BaseException) else ""
        return self._ckpts.quarantine(step, str(reason), error, by, **extra)

    @retrying
    def list_quarantined_checkpoints(self) -> list[dict]:
        """Reason records of every quarantined checkpoint, oldest first."""
        return self._ckpts.quarantined()

    @retrying
    def checkpoint_quarantine_problems(self) -> list[str]:
        """Quarantined checkpoints missing a copy their reason record names."""
        return self._ckpts.quarantine_problems()

    # -- metrics and curriculum ------------------------------------------------------------

    @_writes
    def append_metrics(self, name: str, rows: list[dict] | pa.Table) -> None:
        """Append rows as one part file, named by the time it is written (time_ns), which is
        the append order read_metrics keeps the last row per key by. The part's name is fixed
        before the upload, so a retried upload replaces, never adds."""
        base = f"{self._root}/metrics/{validate_name(name, 'metrics name')}"
        if isinstance(rows, pa.Table):
            table = rows
        else:  # from_pylist would take the columns of the first row only
            rows = list(rows)
            names = dict.fromkeys(k for row in rows for k in row)
            table = pa.table({n: [row.get(n) for row in rows] for n in names})
        if table.num_rows == 0:
            return
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        part = f"{base}/part-{time.time_ns():019d}-{uuid.uuid4().hex[:8]}.parquet"
        self._write_part(part, sink.getvalue().to_pybytes())

    @retrying
    def _write_part(self, path: str, data: bytes) -> None:
        fsio.write_atomic(self._loc, path, data)

    @retrying
    def read_metrics(
        self, name: str, *, all_rows: bool = False, parts_seen: dict | None = None
    ) -> pa.Table:
        """The rows of metrics stream `name`. For a stream with a key (METRICS_KEYS: trainer
        by step, eval by version) one row per key, the LAST written (parts in name order,
        i.e. by their time_ns, then rows in part order), sorted by key; rows whose key is
        null follow, all kept. Other streams, or `all_rows=True`: every row in append order.
        `parts_seen`: a dict the caller keeps between calls (a reader that polls, e.g. the
        tracker mirror): the part files read before are taken from it, only new ones are
        fetched (a committed part never changes: its name is fixed before its one upload), so
        a poll costs one listing plus the new parts, not the whole stream."""
        base = f"{self._root}/metrics/{validate_name(name, 'metrics name')}"
        parts = []
        for info in fsio.ls(self._loc, base):
            part = fsio.basename(info)
            if part.startswith(fsio.TMP_PREFIX):
                continue
            if not _PART_RE.fullmatch(part):
                raise ForeignFileError(
                    f"{self._loc.url_of(info['name'])} is not a metrics part file. "
                    "Fix: move it out of the run directory."
                )
            parts.append(f"{base}/{part}")
        if not parts:
            return pa.table({})
        seen = parts_seen if parts_seen is not None else {}  # part file name -> its table
        names = {p.rsplit("/", 1)[-1] for p in parts}
        new = [p for p in parts if p.rsplit("/", 1)[-1] not in seen]
        if new:
            raws = self._loc.fs.cat(sorted(new))
            seen.update(
                {k.rsplit("/", 1)[-1]: pq.read_table(pa.BufferReader(v)) for k, v in raws.items()}
            )
        for gone in set(seen) - names:
            del seen[gone]
        # append order: part-{time_ns:019d}-{id} sorts by the time it was written
        tables = [seen[n] for n in sorted(names)]
        table = pa.concat_tables(tables, promote_options="permissive")
        return table if all_rows else latest_metrics(name, table)

    @_writes
    @retrying
    def save_curriculum(self, state: dict, version: int) -> None:
        """Commit curriculum state `version`; identical re-save is a no-op. A damaged file
        already at that version (see load_curriculum) is moved aside first, a copy kept under
        quarantine/curriculum/v{N}/, so a state rebuilt from the version before replaces it."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise InvalidInputError(f"curriculum version {version!r} is invalid. Fix: int >= 0.")
        path = self._curriculum_path(version)
        data = _json_bytes({"version": version, "state": state}, "curriculum state", compact=True)
        if damage := _state_damage(state):
            raise InvalidInputError(
                f"curriculum state v{version} is not a curriculum state: {damage}. Fix: save "
                '{"sampler": NoPositiveResampling.state_dict(), "applied": [shard keys]}.'
            )
        if fsio.create_exclusive(self._loc, path, data):
            return
        try:
            existing = fsio.read_bytes(self._loc, path)
        except FileNotFoundError:  # moved aside by another writer meanwhile: try once more
            existing = None
        if existing is not None and _parse_curriculum(existing, version)[1]:
            self._move_curriculum_aside(path, version, existing)
            existing = None
        if existing is None:
            if fsio.create_exclusive(self._loc, path, data):
                return
            existing = fsio.read_bytes(self._loc, path)
        if _parse_curriculum(existing, version)[1] or json.loads(existing) != json.loads(data):
            raise CommitConflictError(
                f"curriculum version {version} is already committed at "
                f"{self._loc.url_of(path)} with a different state. Fix: save under "
                "version + 1."
            )

    def _curriculum_path(self, version: int) -> str:
        return f"{self._root}/curriculum/v{version}.json"

    def _move_curriculum_aside(self, path: str, version: int, raw: bytes) -> None:
        """Copy a damaged curriculum file to quarantine/curriculum/v{N}/q-{digest}.json, then
        remove it (nothing is deleted before its copy exists)."""
        digest = hashlib.sha256(raw).hexdigest()[:12]
        copy = f"{self._root}/quarantine/curriculum/v{version}/q-{digest}.json"
        fsio.write_atomic(self._loc, copy, raw)
        with contextlib.suppress(FileNotFoundError):
            self._loc.fs.rm_file(path)
        _log.warning(
            "moved the damaged curriculum file %s aside to %s; v%d is written again",
            self._loc.url_of(path),
            self._loc.url_of(copy),
            version,
        )

    @retrying
    def list_curriculum_versions(self) -> list[int]:
        """Every committed curriculum version, ascending (intact or damaged: the listing reads
        no file)."""
        base, versions = f"{self._root}/curriculum", []
        for info in fsio.ls(self._loc, base):
            name = fsio.basename(info)
            match = _CURRICULUM_RE.fullmatch(name)
            if name.startswith(fsio.TMP_PREFIX):
                continue
            if not match:
                raise ForeignFileError(
                    f"{self._loc.url_of(info['name'])} is not a curriculum file (v{{N}}.json). "
                    "Fix: move it out of the run directory."
                )
            versions.append(int(match.group(1)))
        return sorted(versions)

    @retrying
    def load_curriculum(self, version: int | None = None) -> tuple[int, dict] | None:
        """(version, state) of the latest committed curriculum, or of `version`; None if none.

        A damaged file (truncated, not JSON, or not {"version": N, "state": {"applied": [...],
        "sampler": {...}}}) is skipped when no version is given: the newest intact version is
        returned, with a warning naming the damaged file (once per file and process); None if
        none is intact. The curriculum stage rebuilds the versions after it from the scored
        shards its `applied` list lacks (tasks/stage_drivers.py), and its save moves the damaged
        file aside. An explicit damaged `version` raises DamagedCurriculumError."""
        if version is not None:
            path = self._curriculum_path(version)
            try:
                raw = fsio.read_bytes(self._loc, path)
            except FileNotFoundError:
                raise NotCommittedError(
                    f"curriculum version {version} is not committed at "
                    f"{self._loc.url_of(path)}. Fix: pick one of list_curriculum_versions()."
                ) from None
            state, damage = _parse_curriculum(raw, version)
            if damage:
                raise DamagedCurriculumError(
                    self.curriculum_damage_message(version, damage), version, damage
                )
            return version, state
        for candidate in reversed(self.list_curriculum_versions()):
            path = self._curriculum_path(candidate)
            try:
                raw = fsio.read_bytes(self._loc, path)
            except FileNotFoundError:  # moved aside by the curriculum stage meanwhile
                continue
            state, damage = _parse_curriculum(raw, candidate)
            if not damage:
                return candidate, state
            url = self._loc.url_of(path)
            if url not in _WARNED:
                _WARNED.add(url)
                _log.warning(
                    "curriculum file %s is damaged (%s); using the newest intact version "
                    "before it (v%d and older are tried). `scalerl resume %s` rebuilds it from "
                    "the scored shards",
                    url,
                    damage,
                    candidate - 1,
                    self.run_id,
                )
        return None

    def curriculum_damage_message(self, version: int, damage: str, finished: bool = False) -> str:
        """The one line for a damaged curriculum file (DamagedCurriculumError, `runs verify`).
        `finished`: the run has finished, so no resume rebuilds it."""
        where = self._loc.url_of(self._curriculum_path(version))
        if finished:
            return (
                f"curriculum file {where} is damaged ({damage}). Fix: restore the file from a "
                "copy of the run; the run has finished, so `scalerl resume` leaves it as it is "
                "(the run no longer uses its curriculum; load_curriculum() without a version "
                "falls back to the newest intact one)"
            )
        return (
            f"curriculum file {where} is damaged ({damage}). Fix: `scalerl resume "
            f"{self.run_id}` rebuilds v{version} from the newest intact version and the scored "
            "shards after it (load_curriculum() without a version falls back to that one), or "
            "restore the file from a copy of the run"
        )

    # -- maintenance -----------------------------------------------------------------------

    @retrying
    def clean_orphans(self, older_than_s: float = 3600.0) -> list[str]:
        """Delete what dead writers left (unreferenced shard data, weight/checkpoint entries
        without a manifest, temp files) last modified more than `older_than_s` ago. Live
        writers finish well within the default hour. Returns the removed URLs."""
        older_than = time.time() - older_than_s
        doomed = self._shards.orphans(older_than)
        doomed += self._weights.orphans(older_than) + self._ckpts.orphans(older_than)
        if self._loc.is_local:  # only local disk has temp files; S3 PUTs are atomic
            for dirpath, _, files in os.walk(self._root):
                for f in files:
                    p = os.path.join(dirpath, f)
                    if f.startswith(fsio.TMP_PREFIX) and os.path.getmtime(p) < older_than:
                        doomed.append(p)
        removed = []
        for path in dict.fromkeys(doomed):
            self._loc.fs.rm(path, recursive=True)
            removed.append(self._loc.url_of(path))
        return removed
