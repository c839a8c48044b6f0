"""The `scalerl` command line.

    scalerl --help
    scalerl config show --preset tiny-cpu --set generation.samples_per_prompt=4
    scalerl config validate my_run.yaml
    scalerl runs ls --storage s3://bucket/prefix

Bad input prints one line saying what is wrong and how to fix it, and exits with code 2; `--debug`
shows the traceback instead. Heavy imports (storage, torch) happen inside the commands so that
`scalerl --help` stays instant.
"""

from __future__ import annotations

import json
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
app.add_typer(config_app, name="config")
app.add_typer(runs_app, name="runs")

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
    str, typer.Option("--storage", help="Run store root: a local path or s3://bucket/prefix.")
]


def _fail(exc: BaseException) -> None:
    """One clear message and exit code 2 for expected errors; the traceback only with --debug."""
    if _state["debug"]:
        raise exc
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


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
def runs_ls(storage: StorageOpt = "./runs") -> None:
    """List the runs under a run store root."""
    from storage import open_store
    from storage.errors import StoreError

    try:
        store = open_store(storage)
        runs = store.list_runs()
    except StoreError as exc:
        _fail(exc)
    if not runs:
        typer.echo(f"no runs under {storage}")
    for run_id in runs:
        typer.echo(run_id)


def main() -> None:
    app(prog_name="scalerl")


if __name__ == "__main__":
    sys.exit(main())
