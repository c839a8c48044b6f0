"""Shared pieces of the `scalerl` CLI: option types, the one-line error rule, store access and
output helpers (tables, CSV, JSON, progress). See flows/cli.py for the commands."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer

_state = {"debug": False}

ConfigFile = Annotated[
    Path | None, typer.Argument(help="YAML run configuration.", show_default=False)
]
PresetOpt = Annotated[
    str | None, typer.Option("--preset", "-p", help="Preset to start from: paper, tiny-cpu.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Dotted override, e.g. generation.samples_per_prompt=8 (repeatable)."
    ),
]
StorageOpt = Annotated[
    str,
    typer.Option(
        "--storage",
        envvar="SCALERL_STORAGE",
        help="Run store root: a local path or s3://bucket/prefix.",
    ),
]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint-url",
        help="S3-compatible endpoint (MinIO, Ceph, R2); default: $AWS_ENDPOINT_URL or AWS.",
    ),
]
RunArg = Annotated[str, typer.Argument(help="Run id (see `scalerl runs ls`).", show_default=False)]
StageOpt = Annotated[
    str | None,
    typer.Option("--stage", help="Stage: raw, scored, filtered, eval (default: rollouts view)."),
]
FormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="Output format: table, csv or json.")
]


def _fail(exc: BaseException) -> None:
    """One clear message and exit code 2 for expected errors; the traceback only with --debug."""
    if _state["debug"]:
        raise exc
    typer.echo(f"error: {' '.join(str(exc).split())}", err=True)  # always one line
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _guard():
    """Expected failures (bad ids, URLs, SQL, credentials, files; a run that failed for good or
    stalled) -> one line and exit 2."""
    from storage.errors import StoreError

    try:
        yield
    except StoreError as exc:
        _fail(exc)
    except RuntimeError as exc:  # a run that failed for good says why and how to resume it
        run_flow = sys.modules.get("flows.run")  # not loaded: the error cannot be its
        if run_flow is None or not isinstance(exc, run_flow.RunFailedError):
            raise
        _fail(exc)
    except PermissionError as exc:  # local files: name the path and the fix, not just errno
        _fail(
            PermissionError(
                f"permission denied: {exc.filename or exc}. Fix: run as a user that may read and "
                "write it, grant access (e.g. `chmod u+rwx`), or pick another --storage root."
            )
        )
    except OSError as exc:
        _fail(_os_error(exc))
    except ValueError as exc:
        _fail(exc)


def _os_error(exc: OSError) -> OSError:
    """A local file error with its path and the fix ('[Errno 20] Not a directory' says neither)."""
    if exc.filename is None or "Fix:" in str(exc):
        return exc
    clear = type(exc)(
        f"{exc.filename}: {exc.strerror or type(exc).__name__}. Fix: check the path (--storage "
        "or -o): every part but the last must be an existing directory, readable (and writable "
        "for outputs) by this user."
    )
    clear.__cause__ = exc  # --debug shows where it came from
    return clear


def _store_options(endpoint_url: str | None) -> dict | None:
    return {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None


def _store(storage: str, endpoint_url: str | None):
    from scalerl.config import check_endpoint_url
    from storage import open_store

    if endpoint_url is not None:
        check_endpoint_url(endpoint_url, "--endpoint-url")
    return open_store(storage, storage_options=_store_options(endpoint_url))


def _open_run(storage: str, endpoint_url: str | None, run_id: str):
    from storage.errors import RunNotFoundError

    store = _store(storage, endpoint_url)
    try:
        return store.run(run_id)
    except RunNotFoundError:
        runs = store.list_runs()
        raise RunNotFoundError(
            f"run {run_id!r} does not exist under {store.url}. Fix: pass one of "
            f"{runs[:10] if runs else 'its runs'} (`scalerl runs ls --storage {store.url}`), "
            "or the --storage the run was started with."
        ) from None


def _load(
    file: Path | None, preset: str | None, overrides: list[str] | None, *, check: bool = True
):
    """The validated RunConfig; with `check`, also the inputs a run reads (see _check_inputs)."""
    from scalerl.config import ConfigError, load_config

    try:
        cfg = load_config(file, preset=preset, overrides=overrides or [])
    except ConfigError as exc:
        _fail(exc)
    if check:
        with _guard():
            _check_inputs(cfg)
    return cfg


def _check_inputs(cfg) -> None:
    """Fail before anything is written when a run could not start from here: the storage URL
    (syntax, then reachable, bucket, credentials; a local root must be writable), the prompts
    (synthetic source name, or the whole data file: columns, text, ids, size), the model (a
    local directory: causal LM, weights, end-of-sequence token; hub ids are checked when the
    run loads them), a storage.run_id that names a directory the store did not create, and one
    that names an existing run started with another config."""
    from runtime.common import BUILTIN_TINY, BUILTIN_TINY_WARM
    from runtime.prompts import prepare_prompts
    from storage.errors import ForeignFileError
    from storage.paths import check_local_access, open_location, validate_name
    from storage.store import RUN_MARKER

    store = _store(cfg.storage.url, cfg.storage.endpoint_url)
    loc = open_location(cfg.storage.url, _store_options(cfg.storage.endpoint_url))
    check_local_access(loc)
    store.check()
    name = cfg.model.name_or_path
    if name.startswith("builtin:") and name not in (BUILTIN_TINY, BUILTIN_TINY_WARM):
        raise ValueError(
            f"model.name_or_path = {name!r} is not a built-in model. Fix: use "
            f"{BUILTIN_TINY!r}, {BUILTIN_TINY_WARM!r}, a local directory or a hub id."
        )
    # the model (a local directory: config, weights, tokenizer; a hub id's tokenizer when
    # cached), then data, eval sets, chat template and prompt lengths
    prepare_prompts(cfg, check_only=True)  # data, eval sets, tokenizer, template, lengths
    from runtime.common import check_lora, check_placement

    check_lora(cfg)  # model.lora: target modules in the model, an engine that serves LoRA
    check_placement(cfg)  # on cuda: processes, devices and memory (scalerl plan)
    run_id = cfg.storage.run_id
    if run_id is not None:
        path = loc.join(validate_name(run_id, "run id"))
        if loc.fs.exists(path) and not loc.fs.exists(f"{path}/{RUN_MARKER}"):
            raise ForeignFileError(
                f"storage.run_id = {run_id!r}: {loc.url_of(path)} exists but was not created by "
                f"the run store (no {RUN_MARKER}). Fix: pick another run id or storage root, or "
                "move that directory away."
            )
        if loc.fs.exists(f"{path}/{RUN_MARKER}"):  # an existing run: only with its own config
            from storage import open_store

            open_store(
                cfg.storage.url, storage_options=_store_options(cfg.storage.endpoint_url)
            ).run(run_id).check_config(cfg.model_dump(mode="json"))


# -- output helpers ---------------------------------------------------------------------------


def _cell(value: object, width: int | None = 60) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if width is not None and math.isfinite(value) else repr(value)
    if isinstance(value, dt.datetime | bytes):
        return str(_jsonable(value))
    text = json.dumps(_jsonable(value)) if isinstance(value, list | dict) else str(value)
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, decimal.Decimal):  # DuckDB sums of integers are HUGEINT -> Decimal
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)  # intervals, UUIDs, ...


def _emit(rows: list[dict], columns: list[str], fmt: str, *, title: str = "", max_rows: int = 0):
    """Print rows as a rich table, CSV or a JSON array (max_rows bounds the table only)."""
    if fmt == "json":
        typer.echo(json.dumps([_jsonable(r) for r in rows], indent=1))
    elif fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_cell(r.get(c), None) for c in columns] for r in rows)
    elif fmt == "table":
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title or None, title_justify="left")
        for c in columns:
            table.add_column(c, overflow="fold")
        shown = rows[:max_rows] if max_rows else rows
        for r in shown:
            table.add_row(*(Text(_cell(r.get(c))) for c in columns))  # Text: no markup
        console = Console(width=None if sys.stdout.isatty() else 200)  # pipes: no wrapping
        console.print(table)
        if len(shown) < len(rows):
            console.print(f"... {len(rows) - len(shown)} more rows (add LIMIT or use --format csv)")
    else:
        _fail(ValueError(f"output format {fmt!r} is unknown. Fix: use table, csv or json."))


@contextlib.contextmanager
def _progress(what: str, unit: str = "shards"):
    """A rich progress bar on a terminal; otherwise a plain line every 10% on stderr."""
    if sys.stdout.isatty():
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(what, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    last = [-1]

    def plain(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth != last[0] or done == total:
            last[0] = tenth
            typer.echo(f"{what}: {done}/{total} {unit}", err=True)

    yield plain


def _query(run, stage: str | None):
    """A RolloutQuery over `run` and the view to read (`stage`, or `rollouts`)."""
    from storage.errors import InvalidInputError
    from storage.query import RolloutQuery

    q = RolloutQuery(run, metrics=False)
    view = stage or "rollouts"
    if view not in q.views:
        q.close()
        raise InvalidInputError(
            f"run {run.run_id!r} has no stage {view!r}. Fix: use one of {q.views[:-1]}."
        )
    return q, view


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- rollouts ---------------------------------------------------------------------------------
