"""Export a run's committed rollout shards to a local directory others can read without scalerl.

    from storage import open_store
    from storage.export import export_run
    result = export_run(open_store("./runs").run("my-run"), "out/my-run", "hf")

Formats (one sub-part per stage; all stages with committed shards unless `stages` is given):

    parquet   DIR/{stage}/{shard key}.parquet    one file per committed shard (zstd), verified
                                                 against its commit record on the way
    jsonl     DIR/{stage}.jsonl                  one JSON object per completion; timestamps as
                                                 ISO 8601, non-finite floats as null
    hf        DIR/ = a datasets.DatasetDict saved with save_to_disk, one split per stage
              (a '-' in a stage name becomes '_'); datasets.load_from_disk(DIR)["filtered"]

DIR/export.json lists the run, the format, and per stage the shard keys and row count.

All or nothing: the export is built in a temporary sibling directory and renamed to DIR at the
end, so a failure (or Ctrl-C) never leaves a half-written DIR. DIR must not exist or be empty.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import InvalidInputError
from storage.schema import SCHEMA_VERSION
from storage.shards import ShardInfo
from storage.store import Run

FORMATS = ("parquet", "jsonl", "hf")
Progress = Callable[[int, int], None]  # (shards done, shards in total)


@dataclass(frozen=True)
class ExportResult:
    """What export_run wrote."""

    path: str
    format: str
    rows: dict[str, int]
    """Rows exported per stage."""
    shards: int


def plan_export(run: Run, stages: list[str] | None = None) -> dict[str, list[ShardInfo]]:
    """Committed shards per stage to export; InvalidInputError if a stage has none."""
    with_shards = {s: run.list_shards(s) for s in run.stages()}
    with_shards = {s: shards for s, shards in with_shards.items() if shards}
    if not with_shards:
        raise InvalidInputError(
            f"run {run.run_id!r} has no committed shards yet. Fix: export once the generators "
            "have committed some (see `scalerl rollouts ls`)."
        )
    if not stages:
        return with_shards
    plan = {}
    for stage in stages:
        shards = with_shards.get(stage) or run.list_shards(stage)
        if not shards:
            raise InvalidInputError(
                f"stage {stage!r} of run {run.run_id!r} has no committed shards. Fix: pick "
                f"one of {sorted(with_shards)}."
            )
        plan[stage] = shards
    return plan


def export_run(
    run: Run,
    out_dir: str | os.PathLike,
    fmt: str,
    *,
    stages: list[str] | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Export committed shards of `run` to `out_dir` in format `fmt` (see the module docstring)."""
    if fmt not in FORMATS:
        raise InvalidInputError(f"export format {fmt!r} is unknown. Fix: use one of {FORMATS}.")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(
            f"{out} already exists and is not an empty directory. Fix: pass a new directory "
            "to -o, or remove the old export first."
        )
    plan = plan_export(run, stages)
    total, done = sum(len(s) for s in plan.values()), 0
    created = next((p for p in reversed(out.parents) if not p.exists()), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".tmp-export-{uuid.uuid4().hex[:12]}-{out.name}"
    final = work / "out"
    rows: dict[str, int] = {}
    try:
        final.mkdir(parents=True)
        staging = work / "staging" if fmt == "hf" else final
        for stage, shards in plan.items():
            rows[stage] = 0
            writer = _JsonlWriter(final / f"{stage}.jsonl") if fmt == "jsonl" else None
            for info in shards:
                table = run.read_shard(stage, info.key)  # CRC-checked against the commit record
                rows[stage] += table.num_rows
                if writer is not None:
                    writer.write(table)
                else:
                    (staging / stage).mkdir(parents=True, exist_ok=True)
                    pq.write_table(
                        table, staging / stage / f"{info.key}.parquet", compression="zstd"
                    )
                done += 1
                if progress is not None:
                    progress(done, total)
            if writer is not None:
                writer.close()
        if fmt == "hf":
            _save_hf(staging, list(plan), final, work / "cache")
        manifest = {
            "run_id": run.run_id,
            "source": run.url,
            "format": fmt,
            "schema_version": SCHEMA_VERSION,
            "exported_at": time.time(),
            "stages": {s: {"rows": rows[s], "shards": [i.key for i in plan[s]]} for s in plan},
        }
        (final / "export.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory everywhere
        os.rename(final, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created is not None and not out.exists():  # leave no empty parents behind
            shutil.rmtree(created, ignore_errors=True)
    return ExportResult(path=str(out), format=fmt, rows=rows, shards=total)


# ----------------------------------------------------------------------------- jsonl
def _json_default(value: object) -> object:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; -inf logprobs become null
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


class _JsonlWriter:
    def __init__(self, path: Path) -> None:
        self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, table: pa.Table) -> None:
        for batch in table.to_batches(max_chunksize=1024):
            for row in batch.to_pylist():
                try:
                    line = json.dumps(row, default=_json_default, allow_nan=False)
                except ValueError:
                    line = json.dumps(_finite(row), default=_json_default, allow_nan=False)
                self._f.write(line + "\n")

    def close(self) -> None:
        self._f.close()


# ----------------------------------------------------------------------------- hf
def _split_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", stage)


def _conform(files: list[Path]) -> None:
    """Give every file of a stage the same schema (the union, extra columns null) in place, so
    `datasets` can read them as one split; pipeline stages already agree, so this rarely runs."""
    schemas = [pq.read_schema(f) for f in files]
    unified = pa.unify_schemas(schemas, promote_options="permissive").remove_metadata()
    for path, schema in zip(files, schemas, strict=True):
        if schema.remove_metadata().equals(unified):
            continue
        table = pq.read_table(path)
        columns = [
            table.column(f.name).cast(f.type)
            if f.name in table.column_names
            else pa.nulls(table.num_rows, f.type)
            for f in unified
        ]
        pq.write_table(pa.table(columns, schema=unified), path, compression="zstd")


def _save_hf(staging: Path, stages: list[str], final: Path, cache: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    splits = {}
    for stage in stages:
        files = sorted((staging / stage).glob("*.parquet"))
        _conform(files)
        splits[_split_name(stage)] = datasets.Dataset.from_parquet(
            [str(f) for f in files], cache_dir=str(cache)
        )
    datasets.DatasetDict(splits).save_to_disk(str(final))
