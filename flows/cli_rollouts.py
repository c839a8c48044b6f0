"""`scalerl rollouts ...`: list, show, stats, SQL and export over a run's committed shards."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import (
    EndpointOpt,
    FormatOpt,
    RunArg,
    StageOpt,
    StorageOpt,
    _emit,
    _guard,
    _ident,
    _open_run,
    _progress,
    _query,
)

rollouts_app = typer.Typer(
    help="Rollout datasets of a run: list, show, stats, SQL, export.", no_args_is_help=True
)


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
            columns = q.sql(f"SELECT * FROM {_ident(view)} LIMIT 0").column_names
            extra = ", filter_reason" if "filter_reason" in columns else ""
            sql = (
                f"SELECT {SHOW_COLUMNS}{extra} FROM {_ident(view)}"
                + (f" WHERE {' AND '.join(where)}" if where else "")
                + f" ORDER BY prompt_id, group_id, sample_index LIMIT {int(limit)}"
            )
            rows = q.sql(sql, params).to_pylist()
            known: list[str] = []  # set when the prompt id is nowhere in the view
            if not rows and prompt is not None:
                ids = f"SELECT DISTINCT prompt_id FROM {_ident(view)}"
                if not q.sql(f"{ids} WHERE prompt_id = ?", [prompt]).num_rows:
                    known = q.sql(f"{ids} ORDER BY 1 LIMIT 5").column("prompt_id").to_pylist()
        if known:
            raise InvalidInputError(
                f"no prompt {prompt!r} in {view!r} of run {run_id!r}; prompt ids look like "
                f"{known[0]} (first few: {', '.join(known)}). Fix: pass one of them, e.g. "
                f"`scalerl rollouts show {run_id} --prompt {known[0]}`, or list them all with "
                f'`scalerl rollouts query {run_id} "SELECT DISTINCT prompt_id FROM {view} '
                'ORDER BY 1"`.'
            )
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
        # soft_wrap: a header or completion is never broken across lines (pipes, grep)
        console.print(Text(head, style="bold"), soft_wrap=True)
        console.print(Text(text), Text(""), soft_wrap=True)


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
metrics_trainer, metrics_scaling (metric rows, when present).

Read-only: the query sees these views and nothing else. File functions (read_csv,
read_parquet, glob, ...), COPY, EXPORT, ATTACH, INSTALL, LOAD and SET are refused (exit 2);
to use DuckDB freely, export the run (`scalerl rollouts export RUN -f parquet -o DIR`).
Examples:

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
