"""What a run shows in the Prefect UI: a progress bar, a table of the latest trainer metrics, and a
markdown run report (config summary, fitted A / B / C_mid, where shards, weights and plots live,
then one table per evaluation set: versions as rows, mean@K / pass@K / maj@K as columns).
Quarantined shards (unusable input a stage or the trainer took out of use) are counted in the
metrics table's description, listed with their reasons in a `quarantine` table artifact, and in
the run report.

Artifact keys are derived from the run id so every run keeps its own history in the UI.
"""

from __future__ import annotations

import re

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from runtime.common import open_run
from runtime.isolated import run_isolated
from scalerl.config import RunConfig
from tasks.scaling import describe_half_run
from tasks.stages import read_or_quarantine

TRAINER_METRICS = "trainer"
TABLE_COLUMNS = (
    "step",
    "loss",
    "pass_rate",
    "samples_kept",
    "groups_zero_variance",
    "samples_dropped_stale",
    "tokens",
    "completion_len_mean",
    "truncation_rate",
    "interruption_rate",
    "reward_scorer_errors",
    "shards_rejected",
    "lr",
    "grad_norm",
    "step_time_s",
    "wait_s",
)


def artifact_key(run_id: str, what: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"scalerl-{run_id}-{what}".lower()).strip("-")


def start_progress(run_id: str, max_steps: int):
    return create_progress_artifact(
        progress=0.0,
        key=artifact_key(run_id, "progress"),
        description=f"Trainer steps done of {max_steps} planned (run {run_id})",
    )


def set_progress(
    artifact_id,
    step: int,
    max_steps: int,
    quarantined: int | None = None,
    run_id: str = "",
    pass_rate: tuple[int, float] | None = None,
) -> None:
    """Move the progress bar; with `quarantined`, its description also counts quarantined
    shards (e.g. len(run.quarantined_keys())); with `pass_rate` (version, rate), it shows the
    latest held-out pass rate."""
    if artifact_id is None:
        return
    description = None
    if quarantined is not None:
        description = (
            f"Trainer steps done of {max_steps} planned (run {run_id}); "
            f"{quarantined} shard(s) quarantined"
        )
        if pass_rate is not None:
            description += f"; held-out pass rate {pass_rate[1]:.3f} at version {pass_rate[0]}"
    update_progress_artifact(
        artifact_id,
        progress=min(100.0, 100.0 * step / max(1, max_steps)),
        description=description,
    )


def latest_pass_rate(run) -> tuple[int, float] | None:
    """(version, held-out pass rate) of the newest evaluation, or None before the first."""
    from scalerl.stats import eval_points

    _, rate, steps = eval_points(run.read_metrics("eval"))
    return (steps[-1], rate[-1]) if steps else None


@task(name="publish-metrics-table", retries=2, retry_delay_seconds=[2, 10], cache_policy=None)
def publish_metrics_table(config: RunConfig, run_id: str, last: int = 20) -> int:
    """Table artifact of the latest trainer metrics rows (and, when any shard is quarantined, a
    table of them with their reasons); returns the metrics rows shown."""
    run = open_run(config, run_id)
    quarantined = run.list_quarantined()
    if quarantined:
        publish_quarantine_table(run_id, quarantined)
    table = run.read_metrics(TRAINER_METRICS)
    if table.num_rows == 0:
        return 0
    rows = table.slice(max(0, table.num_rows - last)).to_pylist()
    shown = [{k: _fmt(row.get(k)) for k in TABLE_COLUMNS if k in row} for row in rows]
    create_table_artifact(
        shown,
        key=artifact_key(run_id, "metrics"),
        description=f"Latest trainer metrics of run {run_id}; "
        f"{len(quarantined)} shard(s) quarantined",
    )
    return len(shown)


def quarantine_rows(quarantined: list[dict]) -> list[dict]:
    """One row per quarantined shard: stage, key, error, who found it, when, reason, copy."""
    import datetime as dt

    return [
        {
            "stage": q["stage"],
            "key": q["key"],
            "error": q.get("error") or "",
            "by": q.get("by") or "",
            "when": dt.datetime.fromtimestamp(q["quarantined_at"], dt.UTC).strftime(
                "%Y-%m-%d %H:%M:%S UTC"
            ),
            "reason": q["reason"].split(" Fix:")[0],
            "copy": q.get("data_copy") or q.get("record_copy") or "",
        }
        for q in quarantined
    ]


def publish_quarantine_table(run_id: str, quarantined: list[dict]) -> None:
    create_table_artifact(
        quarantine_rows(quarantined),
        key=artifact_key(run_id, "quarantine"),
        description=f"{len(quarantined)} shard(s) of run {run_id} quarantined (unusable input, "
        "taken out of use with the reason; the run continued without them)",
    )


def _fmt(value):
    return round(value, 5) if isinstance(value, float) else value


def render_report(
    config: RunConfig,
    run_id: str,
    run_url: str,
    summary: dict,
    fit: dict | None,
    plots: dict[str, str],
    quarantined: list[dict] | None = None,
    set_rows: list[dict] | None = None,
    prompt_rows: list[dict] | None = None,
) -> str:
    """The run report's markdown; `set_rows` are the rows of metrics stream eval_sets (one per
    version and evaluation set), shown as a table per set at the end; `prompt_rows` those of
    stream prompts (per split: prompts kept, dropped as too long, the chat template)."""
    alg, gen = config.algorithm, config.generation
    lines = [
        f"# ScaleRL run `{run_id}`",
        "",
        f"State: **{summary.get('state', 'unknown')}** ({summary.get('reason', '')}); trainer step {summary.get('step', 0)} of {config.schedule.max_steps}.",
        "",
        "## Recipe",
        "",
        f"- model `{config.model.name_or_path}` ({config.model.dtype}), engine `{gen.engine}`",
        f"- {gen.prompts_per_batch} prompts x {gen.samples_per_prompt} samples, k = {config.pipeline.max_off_policy_steps}",
        f"- loss `{alg.loss.type}` ({alg.loss.model_dump(exclude={'type'})}), aggregation `{alg.aggregation}`, advantages `{alg.advantage_normalization}`",
        f"- zero-variance filter {alg.zero_variance_filter}, No-Positive-Resampling {alg.no_positive_resampling} (>= {alg.pass_rate_threshold}), FP32 head {alg.fp32_lm_head}",
        f"- optimizer AdamW lr {config.optimizer.lr:g}, warmup {config.optimizer.warmup_steps}, eps {config.optimizer.eps:g}",
        "",
        "## Scaling fit",
        "",
    ]
    if fit:
        lines += [
            "| A | B | C_mid | R0 | A interval | points |",
            "|---|---|---|---|---|---|",
            f"| {fit['A']:.3f} | {fit['B']:.2f} | {fit['C_mid']:.4g} | {fit['R0']:.3f} | [{fit['A_low']:.3f}, {fit['A_high']:.3f}] | {fit['n_points']} |",
            "",
            f"Compute axis: {fit['compute_unit']}. Final {pass_rate_label(config)} {fit['final_pass_rate']:.3f}.",
        ]
        if (half_run := describe_half_run(fit)) is not None:
            lines.append(f"Fit on the first half of the compute: {half_run}.")
    else:
        lines.append("Not enough evaluation points for a fit yet.")
    lines += [
        "",
        "## Data",
        "",
        f"- run directory: `{run_url}`",
        f"- rollout shards: `{run_url}/shards/{{raw,scored,filtered,eval}}/` (Parquet; query with DuckDB, polars, pandas)",
        f"- weights: `{run_url}/weights/`, checkpoints: `{run_url}/checkpoints/`, metrics: `{run_url}/metrics/`",
    ]
    lines += [f"- {name}: `{path}`" for name, path in plots.items()]
    quarantined = quarantined or []
    lines += ["", "## Quarantined shards", ""]
    if quarantined:
        lines += [
            f"{len(quarantined)} shard(s) could not be used and were moved to "
            f"`{run_url}/quarantine/` with the reason; the run continued without them.",
            "",
            "| stage | key | error | found by | when | reason | copy |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in quarantine_rows(quarantined):
            cells = [str(v).replace("|", "\\|").replace("\n", " ") for v in row.values()]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("None: every committed shard was readable.")
    lines += ["", *prompts_markdown(prompt_rows or [])]
    lines += ["", *evaluation_sets_markdown(config, set_rows or [])]
    return "\n".join(lines) + "\n"


def prompts_markdown(prompt_rows: list[dict]) -> list[str]:
    """Section "Prompts": per split, the prompts the run uses and those dropped because their
    rendered text was over generation.max_prompt_tokens (runtime/prompts.py); raw prompts that all
    fit leave no rows, and the section says so."""
    lines = ["## Prompts", ""]
    if not prompt_rows:
        return [*lines, "Raw text (no chat template); no prompt was over the prompt budget."]
    first = prompt_rows[0]
    lines += [
        f"Chat template: `{first['chat_template']}`; prompt budget "
        f"{first['max_prompt_tokens']} tokens after rendering (longer prompts are dropped, "
        "never truncated).",
        "",
        "| split | prompts | dropped (too long) | longest dropped (tokens) |",
        "|---|---|---|---|",
    ]
    for r in prompt_rows:
        longest = r["longest_dropped_tokens"] or ""
        lines.append(f"| {r['split']} | {r['prompts']} | {r['dropped_too_long']} | {longest} |")
    return lines


def pass_rate_label(config: RunConfig) -> str:
    """What the run's pass-rate curve is: the held-out pass rate, or the mean pass rate of the
    evaluation set named by evaluation.fit_set."""
    from scalerl.config import HELDOUT_SET

    fit_set = config.evaluation.fit_set
    return "held-out pass rate" if fit_set == HELDOUT_SET else f"{fit_set} mean pass rate"


SET_ROW_COLUMNS = ("version", "compute", "prompts", "samples_per_prompt")
SET_ROW_TAIL = ("mean_length", "truncation_rate", "interruption_rate")


def evaluation_sets_markdown(config: RunConfig, set_rows: list[dict]) -> list[str]:
    """Section "Evaluation sets": which set the fit uses, then per set (in the config's order)
    a table with one row per evaluated version and its metrics (mean@K, pass@K, maj@K) as
    columns."""
    from runtime.evaluation import eval_sets
    from scalerl.eval_metrics import metric_name

    fit_set = config.evaluation.fit_set
    lines = [
        "## Evaluation sets",
        "",
        f"The scaling fit and the pass-rate curve use the set `{fit_set}` (evaluation.fit_set): "
        "its mean pass rate over every sample.",
    ]
    for s in eval_sets(config):
        rows = sorted((r for r in set_rows if r.get("set") == s.name), key=lambda r: r["version"])
        metrics = [metric_name(kind, k) for kind, k in s.metric_ks]
        lines += ["", f"### `{s.name}`{' (fit)' if s.name == fit_set else ''}", ""]
        if not rows:
            lines.append("Not evaluated yet.")
            continue
        columns = [*SET_ROW_COLUMNS, *metrics, *SET_ROW_TAIL]
        lines += [
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
            *("| " + " | ".join(_cell(r.get(c), c) for c in columns) + " |" for r in rows),
        ]
    return lines


def _cell(value, column: str = "") -> str:
    if value is None:
        return ""
    if column == "compute":
        return f"{value:.4g}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def plots_dpi() -> int:
    from scalerl.plots import DPI

    return DPI


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=plots_dpi())
    return buf.getvalue()


def _sigmoid_of(fit: dict | None, compute: list[float], rate: list[float]):
    """The SigmoidFit to draw: the run's fit when given; while the run goes, a quick one (no
    bootstrap) once there are enough points after version 0; else None (points only)."""
    from scalerl.scaling import MIN_POINTS, SigmoidFit, fit_sigmoid

    if fit:
        return SigmoidFit(
            fit["A"],
            fit["B"],
            fit["C_mid"],
            fit["R0"],
            fit["residual"],
            fit["n_points"],
            (fit["A_low"], fit["A_high"]),
        )
    if len(compute) > MIN_POINTS and compute[0] == 0.0:
        try:
            return fit_sigmoid(compute[1:], rate[1:], R0=rate[0], exclude_fraction=0.0, bootstrap=0)
        except ValueError:  # a degenerate curve (e.g. flat): draw the points alone
            return None
    return None


@task(name="render-plots", retries=1, retry_delay_seconds=[5], cache_policy=None)
def render_plots(config: RunConfig, run_id: str, fit: dict | None) -> dict[str, str]:
    """PNG figures into the run's plots/ and, as pictures, into the run's `plots` artifact in the
    Prefect UI: pass rate vs compute with the fitted sigmoid and its extrapolation, completion
    lengths with the interruption window, staleness of trained samples. Also the `evaluations`
    table artifact. Called while the run goes (fit None: a quick fit once enough points exist)
    and at its end. The drawing runs in a child process (runtime/isolated.py, at
    evaluation.nice) so that the flow process never loads matplotlib; the artifacts are made
    here. Returns name -> URL of the stored PNGs."""
    import base64

    from scalerl.stats import eval_points

    encoded = run_isolated(  # (the child's result travels as JSON: base64 text)
        "tasks.report:draw_plots",
        config,
        "plots",
        nice=config.evaluation.nice,
        run_id=run_id,
        fit=fit,
    )
    pngs = {name: base64.b64decode(data) for name, data in encoded.items()}
    run = open_run(config, run_id)
    urls = {name: run.save_plot(name, png) for name, png in pngs.items()}
    if pngs:
        create_markdown_artifact(
            plots_markdown(run_id, pngs, urls, final=fit is not None),
            key=artifact_key(run_id, "plots"),
            description=f"Plots of run {run_id}: pass-rate curve, completion lengths, staleness",
        )
    compute, rate, steps = eval_points(run.read_metrics("eval"))
    if compute:
        publish_evaluations_table(
            run_id, compute, rate, steps, config.schedule.compute_unit, pass_rate_label(config)
        )
    return urls


def draw_plots(config: RunConfig, run_id: str, fit: dict | None) -> dict[str, str]:
    """name -> base64 of the PNG of each of the run's figures, drawn from the store (see
    render_plots)."""
    import base64

    import pyarrow as pa
    import pyarrow.compute as pc

    from scalerl import plots
    from scalerl.stats import eval_points, staleness_histogram

    run, pngs = open_run(config, run_id), {}
    compute, rate, _ = eval_points(run.read_metrics("eval"))
    if compute:
        figure = plots.curve_figure(
            compute,
            rate,
            _sigmoid_of(fit, compute, rate),
            target_compute=2 * max(compute),
            compute_unit=config.schedule.compute_unit,
            title=f"{run_id}: {pass_rate_label(config)} vs compute",
            half_run=fit,
        )
        pngs["curve"] = _png(figure)
    shards = run.list_shards("raw")[-20:]
    tables = [read_or_quarantine(run, "raw", s.key, "render-plots")[0] for s in shards]
    tables = [t.select(["completion_token_ids", "finish_reason"]) for t in tables if t is not None]
    if tables:
        table = pa.concat_tables(tables)
        lc = config.length_control
        figure = plots.lengths_figure(
            pc.list_value_length(table["completion_token_ids"]).to_pylist(),
            table["finish_reason"].to_pylist(),
            window=(lc.thinking_budget_min, lc.thinking_budget_max) if lc.enabled else None,
            max_tokens=config.generation.max_new_tokens,
            title=f"{run_id}: completion lengths (last {len(tables)} shards)",
        )
        pngs["lengths"] = _png(figure)
    histogram = staleness_histogram(run.read_metrics("trainer"))
    if histogram:
        figure = plots.staleness_figure(
            histogram,
            k=config.pipeline.max_off_policy_steps,
            title=f"{run_id}: staleness of trained samples",
        )
        pngs["staleness"] = _png(figure)
    return {name: base64.b64encode(png).decode("ascii") for name, png in pngs.items()}


PLOT_CAPTIONS = {
    "curve": "Held-out pass rate against compute: evaluations (points), the fitted sigmoid "
    "(solid) and its extrapolation (dashed); at the end, the prediction made from the first "
    "half of the compute with its 90% interval",
    "lengths": "Completion lengths of the latest shards by finish reason, with the "
    "interruption window",
    "staleness": "Staleness of trained samples (trainer step minus the oldest policy version "
    "of their tokens), against the bound k",
}


def plots_markdown(
    run_id: str, pngs: dict[str, bytes], urls: dict[str, str], *, final: bool
) -> str:
    """Markdown with each PNG inline as a data: URI (the UI has no access to the run store, so a
    path would show nothing), its caption, and where the file is kept."""
    import base64

    when = "at the end of the run" if final else "while the run goes (updated as it evaluates)"
    lines = [f"# Plots of run `{run_id}`", "", f"Drawn {when}.", ""]
    for name, png in pngs.items():
        data = base64.b64encode(png).decode("ascii")
        lines += [
            f"## {name}",
            "",
            f"![{PLOT_CAPTIONS.get(name, name)}](data:image/png;base64,{data})",
            "",
            f"{PLOT_CAPTIONS.get(name, name)}. File: `{urls.get(name, '')}`",
            "",
        ]
    return "\n".join(lines)


def publish_evaluations_table(
    run_id: str,
    compute: list[float],
    rate: list[float],
    steps: list[int],
    unit: str,
    label: str = "held-out pass rate",
) -> None:
    """Table artifact: one row per evaluated policy version (version, compute, the fit set's
    pass rate, named by `label`)."""
    rows = [
        {"version": step, f"compute ({unit})": c, label: round(r, 4)}
        for step, c, r in zip(steps, compute, rate, strict=True)
    ]
    create_table_artifact(
        rows,
        key=artifact_key(run_id, "evaluations"),
        description=f"Every evaluation of run {run_id} ({label} per version)",
    )


@task(name="publish-run-report", retries=2, retry_delay_seconds=[2, 10], cache_policy=None)
def publish_run_report(
    config: RunConfig,
    run_id: str,
    summary: dict,
    fit: dict | None,
    plots: dict[str, str] | None = None,
) -> str:
    run = open_run(config, run_id)
    quarantined = run.list_quarantined()
    set_rows = run.read_metrics("eval_sets").to_pylist()
    prompt_rows = run.read_metrics("prompts").to_pylist()
    text = render_report(
        config, run_id, run.url, summary, fit, plots or {}, quarantined, set_rows, prompt_rows
    )
    if quarantined:
        publish_quarantine_table(run_id, quarantined)
    create_markdown_artifact(
        text, key=artifact_key(run_id, "report"), description=f"ScaleRL run report {run_id}"
    )
    return text
