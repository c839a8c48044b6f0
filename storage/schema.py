"""Rollout schema v1: one row per completion, the unit every pipeline stage exchanges.

    from storage import ROLLOUT_SCHEMA, rollouts_from_records, validate_rollouts
    table = rollouts_from_records([{"run_id": "r1", "shard_id": "gen0-000001", ...}])
    validate_rollouts(table)          # raises InvalidRolloutsError naming the column and the fix

Shards are Parquet (zstd); the schema version and the owning run are stored in the file's
key-value metadata under b"scalerl.schema_version" and b"scalerl.run_id". Field meanings and
who fills each one are documented in docs/ROLLOUT_SCHEMA.md. Stages may append extra columns;
the columns below are required with exactly these types.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import InvalidInputError, InvalidRolloutsError

SCHEMA_VERSION = 1
VERSION_KEY = b"scalerl.schema_version"
RUN_ID_KEY = b"scalerl.run_id"
FINISH_REASONS = ("stop", "length", "interrupted")

_UTC_MS = pa.timestamp("ms", tz="UTC")

ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("answer", pa.string()),
        pa.field("completion", pa.string(), nullable=False),
        pa.field("completion_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("versions", pa.list_(pa.int32()), nullable=False),
        pa.field("sampled", pa.list_(pa.bool_()), nullable=False),
        pa.field("min_version", pa.int32(), nullable=False),
        pa.field("max_version", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("thinking_tokens", pa.int32(), nullable=False),
        pa.field("answer_tokens", pa.int32(), nullable=False),
        pa.field("reward", pa.float32()),
        pa.field("passed", pa.bool_()),
        pa.field("reward_reason", pa.string()),
        pa.field("generator_id", pa.string(), nullable=False),
        pa.field("started_at", _UTC_MS, nullable=False),
        pa.field("finished_at", _UTC_MS, nullable=False),
    ]
)

PROMPT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("answer", pa.string()),
        pa.field("task", pa.string(), nullable=False),
    ]
)

_OPTIONAL_IN_RECORDS = ("answer", "reward", "passed", "reward_reason")


def _same_type(found: pa.DataType, expected: pa.DataType) -> bool:
    # Parquet round trips rename list items ("item" -> "element"); only the value type matters.
    if pa.types.is_list(expected):
        return pa.types.is_list(found) and found.value_type == expected.value_type
    return found == expected


def check_columns(table: pa.Table, schema: pa.Schema, what: str, error: type) -> None:
    """Raise `error` unless `table` has every column of `schema` with its type and no nulls
    where the field is not nullable. Extra columns are allowed."""
    if not isinstance(table, pa.Table):
        raise InvalidInputError(
            f"{what} must be a pyarrow.Table, got {type(table).__name__}. "
            "Fix: build it with pyarrow.Table.from_pylist(rows, schema=...)."
        )
    names = set(table.column_names)
    missing = [f.name for f in schema if f.name not in names]
    if missing:
        raise error(
            f"{what} lacks column(s) {missing}. Fix: add them (see docs/ROLLOUT_SCHEMA.md); "
            f"required columns are {schema.names}."
        )
    for field in schema:
        found = table.schema.field(field.name).type
        if not _same_type(found, field.type):
            raise error(
                f"{what} column '{field.name}' has type {found}, expected {field.type}. "
                f"Fix: cast it, e.g. table.set_column(i, '{field.name}', "
                f"table['{field.name}'].cast(pa.{field.type}))."
            )
        if not field.nullable and table.column(field.name).null_count:
            raise error(
                f"{what} column '{field.name}' has {table.column(field.name).null_count} null(s) "
                f"but is required. Fix: fill '{field.name}' in every row."
            )


def _lengths(col: pa.ChunkedArray) -> np.ndarray:
    return pc.list_value_length(col).to_numpy(zero_copy_only=False)


def _list_min_max(col: pa.ChunkedArray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row min and max of a list<int32> column over rows with a non-empty list."""
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))[lengths > 0]
    if not len(starts):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.minimum.reduceat(flat, starts), np.maximum.reduceat(flat, starts)


def validate_rollouts(table: pa.Table) -> None:
    """Check a rollout table against ROLLOUT_SCHEMA v1; raise InvalidRolloutsError otherwise.

    Checks column names and types, required (non-null) columns, that logprobs and versions
    have one entry per completion token, finish_reason values, and that min_version and
    max_version equal the min and max of versions (rows with no tokens are exempt).
    """
    check_columns(table, ROLLOUT_SCHEMA, "rollout table", InvalidRolloutsError)
    if table.num_rows == 0:
        return
    n_tokens = _lengths(table.column("completion_token_ids"))
    for name in ("logprobs", "versions", "sampled"):
        bad = np.flatnonzero(_lengths(table.column(name)) != n_tokens)
        if len(bad):
            raise InvalidRolloutsError(
                f"rollout column '{name}' has a different length than completion_token_ids "
                f"in {len(bad)} row(s) (first: row {bad[0]}). Fix: record one {name} entry "
                "per completion token."
            )
    reasons = table.column("finish_reason")
    ok = pc.is_in(reasons, value_set=pa.array(FINISH_REASONS))
    if not pc.all(ok).as_py():
        first = pc.filter(reasons, pc.invert(ok))[0].as_py()
        raise InvalidRolloutsError(
            f"rollout column 'finish_reason' holds {first!r}. Fix: use one of {FINISH_REASONS}."
        )
    lo, hi = _list_min_max(table.column("versions"), n_tokens)
    nonempty = n_tokens > 0
    for name, expect in (("min_version", lo), ("max_version", hi)):
        got = table.column(name).to_numpy(zero_copy_only=False)[nonempty]
        bad = np.flatnonzero(got != expect)
        if len(bad):
            row = int(np.flatnonzero(nonempty)[bad[0]])
            raise InvalidRolloutsError(
                f"rollout column '{name}' is {int(got[bad[0]])} in row {row} but the versions "
                f"list gives {int(expect[bad[0]])}. Fix: set {name} from versions, or leave it "
                "out of the records and let rollouts_from_records compute it."
            )
    if pc.any(pc.greater(table.column("min_version"), table.column("max_version"))).as_py():
        raise InvalidRolloutsError(
            "rollout column 'min_version' exceeds 'max_version' in some row. "
            "Fix: min_version <= max_version."
        )


def _as_timestamp(value: object) -> object:
    # Epoch seconds (time.time()) are the natural thing for a generator to record.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(float(value), tz=dt.UTC)
    return value


def rollouts_from_records(records: Iterable[dict]) -> pa.Table:
    """Build a valid rollout table from dicts (one per completion).

    Optional keys (answer, reward, passed, reward_reason) default to null; `sampled` defaults
    to all True (every token drawn by the policy, none injected); min_version and
    max_version are computed from versions when absent; started_at/finished_at accept
    datetime objects or epoch seconds. The result passes validate_rollouts.
    """
    rows = []
    for i, record in enumerate(records):
        row = {name: None for name in _OPTIONAL_IN_RECORDS} | dict(record)
        versions = row.get("versions")
        if row.get("sampled") is None and isinstance(row.get("completion_token_ids"), list):
            row["sampled"] = [True] * len(row["completion_token_ids"])
        for name, fn in (("min_version", min), ("max_version", max)):
            if row.get(name) is None:
                if not versions:
                    raise InvalidRolloutsError(
                        f"record {i} has no versions to compute {name} from. "
                        f"Fix: pass {name} explicitly for completions without tokens."
                    )
                row[name] = fn(versions)
        for name in ("started_at", "finished_at"):
            row[name] = _as_timestamp(row.get(name))
        rows.append(row)
    try:
        table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise InvalidRolloutsError(
            f"records do not fit the rollout schema: {e}. Fix: give every required field "
            f"({[f.name for f in ROLLOUT_SCHEMA if not f.nullable]}) a value of the right type."
        ) from e
    validate_rollouts(table)
    return table
