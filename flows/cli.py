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

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import (
    ConfigFile,
    EndpointOpt,
    PresetOpt,
    RunArg,
    SetOpt,
    StorageOpt,
    _guard,
    _load,
    _open_run,
    _state,
    _store,
)
from flows.cli_curve import curve_app
from flows.cli_doctor import doctor
from flows.cli_rollouts import rollouts_app

app = typer.Typer(
    name="scalerl",
    help="ScaleRL: predictable RL training of reasoning LLMs, as a Prefect pipeline with rollout datasets in object storage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect and validate run configurations.", no_args_is_help=True)
runs_app = typer.Typer(help="Runs in a run store.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(runs_app, name="runs")
app.add_typer(rollouts_app, name="rollouts")
app.add_typer(curve_app, name="curve")
app.command("doctor")(doctor)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


@config_app.command("show")
def config_show(
    file: ConfigFile = None, preset: PresetOpt = None, overrides: SetOpt = None
) -> None:
    """Print the fully resolved configuration (defaults + preset + file + overrides) as YAML."""
    from scalerl.config import dump_config

    typer.echo(dump_config(_load(file, preset, overrides, check=False)), nl=False)


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


RunIdOpt = Annotated[
    str | None, typer.Option("--run-id", help="Run id (default: a new timestamped id).")
]


def _print_summary(summary: dict, storage_url: str) -> None:
    typer.echo(f"run {summary['run_id']}: step {summary.get('step')} ({summary.get('reason')})")
    fit = summary.get("fit")
    if fit:
        typer.echo(
            f"sigmoid fit: A={fit['A']:.3f} [{fit['A_low']:.3f}, {fit['A_high']:.3f}] "
            f"B={fit['B']:.2f} C_mid={fit['C_mid']:.4g} R0={fit['R0']:.3f}; "
            f"final held-out pass rate {fit['final_pass_rate']:.3f}"
        )
        if fit.get("half_run_prediction") is not None:
            typer.echo(
                f"fit on the first half predicted {fit['half_run_prediction']:.3f} "
                f"(error {fit['half_run_error']:.3f})"
            )
    typer.echo(
        f"data: {storage_url}/{summary['run_id']}  (scalerl rollouts ls {summary['run_id']})"
    )


@app.command("run")
def run_cmd(
    file: ConfigFile = None,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    storage: Annotated[
        str | None, typer.Option("--storage", help="Run store root (sets storage.url).")
    ] = None,
    run_id: RunIdOpt = None,
) -> None:
    """Start a ScaleRL run and follow it to the end.

    Without PREFECT_API_URL a temporary local Prefect server is started; with it, the run is
    visible in that server's UI. The config is validated before anything is written."""
    extra = [f"storage.url={storage}"] if storage else []
    if run_id:  # so the input checks cover it (a directory the store did not create is refused)
        extra.append(f"storage.run_id={run_id}")
    cfg = _load(file, preset, [*(overrides or []), *extra])
    from flows.cli_progress import run_progress
    from flows.run import scalerl_run
    from tasks.common import new_run_id

    run_id = run_id or cfg.storage.run_id or new_run_id()
    with _guard(), run_progress(cfg, run_id):
        summary = scalerl_run(cfg, run_id=run_id)
    _print_summary(summary, cfg.storage.url)


@app.command("resume")
def resume_cmd(
    run_id: RunArg, storage: StorageOpt = "./runs", endpoint_url: EndpointOpt = None
) -> None:
    """Continue a failed or interrupted run from what it committed: shards are not regenerated
    or rescored, the trainer restarts from its checkpoint, the curriculum from its state.

    A finished run is left as it is (one line, exit 0). A run read from another place than the
    one it was started at (moved, or another mount/endpoint) gets its run.json storage section
    pointed at the new place; the rest of the snapshot is never changed."""
    from flows.cli_progress import run_progress
    from flows.run import scalerl_run

    with _guard():
        run = _open_run(storage, endpoint_url, run_id)  # a clear error for an unknown id
        status = run.read_status() or {}
        if status.get("state") == "finished":
            typer.echo(
                f"run {run_id} already finished at step {status.get('step')} "
                f"({status.get('reason') or 'no reason recorded'}): nothing to resume, nothing "
                "written. To train further, start a new run (`scalerl run`)."
            )
            return
        cfg = _resume_config(run, storage, endpoint_url)
        with run_progress(cfg, run_id):
            summary = scalerl_run(cfg, run_id=run_id)
    _print_summary(summary, storage)


def _resume_config(run, storage: str, endpoint_url: str | None):
    """The run's own config snapshot, as the flow must see it to accept it as the same run.

    prepare_run refuses a config that differs from run.json, so the snapshot is used verbatim
    when the run is read from where it was started; when it was moved (another storage URL or
    endpoint), only run.json's storage section is rewritten to the new place."""
    from scalerl.config import validate_config

    saved = run.read_config()
    where = saved.get("storage") or {}
    if where.get("url") == storage and where.get("endpoint_url") == endpoint_url:
        return validate_config(saved)
    moved = validate_config(
        {**saved, "storage": {**where, "url": storage, "endpoint_url": endpoint_url}}
    )
    run.write_config(moved.model_dump(mode="json"), overwrite=True)
    return moved


@app.command(
    "compare",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def compare_cmd(ctx: typer.Context) -> None:
    """Recipes side by side at equal compute (scalerl, grpo, dapo, no-fp32-head, sync) over
    seeds: a Table-1-like summary (A, B, C_mid with spread) and one plot of all curves.
    `scalerl compare --help` lists the options."""
    from flows.compare import main as compare_main

    with _guard():
        compare_main(list(ctx.args))


@runs_app.command("verify")
def runs_verify(
    run_id: RunArg, storage: StorageOpt = "./runs", endpoint_url: EndpointOpt = None
) -> None:
    """Check a run from its stored data: no committed shard lost, nothing trained twice,
    continuous weight versions, curriculum retirements never undone. Exit 1 on a problem."""
    from tasks.verify import verify_run

    with _guard():
        report = verify_run(_open_run(storage, endpoint_url, run_id))
    for key, value in report.facts.items():
        typer.echo(f"{key}: {value}")
    for note in report.notes:
        typer.echo(note)
    for problem in report.problems:
        typer.echo(f"PROBLEM: {problem}")
    typer.echo("ok" if report.ok else f"{len(report.problems)} problem(s)")
    if not report.ok:
        raise typer.Exit(code=1)


def main() -> None:
    app(prog_name="scalerl")


if __name__ == "__main__":
    sys.exit(main())
