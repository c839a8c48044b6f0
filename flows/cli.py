"""The `scalerl` command line.

    scalerl --help
    scalerl config show --preset tiny-cpu --set generation.samples_per_prompt=4
    scalerl config validate my_run.yaml
    scalerl plan my_run.yaml                         # processes, devices, memory per device
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
from flows.cli_export_model import runs_export_model
from flows.cli_rollouts import rollouts_app
from flows.cli_signals import graceful_stop
from flows.cli_tracking import runs_track

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
runs_app.command("track")(runs_track)
runs_app.command("export-model")(runs_export_model)


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
    """List the runs under a run store root: id, state, trainer step, latest held-out pass rate
    (with the version it was measured at), when it started, and the store."""
    import datetime as dt

    from scalerl.stats import eval_points

    with _guard():
        store = _store(storage, endpoint_url)
        runs = store.list_runs()
        rows = []
        for run_id in runs:
            run = store.run(run_id)
            status = run.read_status() or {}
            _, rate, versions = eval_points(run.read_metrics("eval"))
            started = run.created_at()
            rows.append(
                (
                    run_id,
                    status.get("state", "-"),
                    str(run.latest_weights_version() or 0),
                    f"{rate[-1]:.3f} (v{versions[-1]})" if rate else "-",
                    dt.datetime.fromtimestamp(started, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
                    if started
                    else "-",
                )
            )
    if not runs:
        typer.echo(f"no runs under {storage}")
        return
    header = ("RUN", "STATE", "STEP", "PASS RATE", "STARTED")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    typer.echo(f"storage: {storage}")
    for row in [header, *rows]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


RunIdOpt = Annotated[
    str | None, typer.Option("--run-id", help="Run id (default: a new timestamped id).")
]


def _print_summary(summary: dict, storage_url: str) -> None:
    if summary.get("state") == "stopped":
        typer.echo(
            f"run {summary['run_id']} stopped at step {summary.get('step')} "
            f"({summary.get('stopped')}); continue it with `scalerl resume {summary['run_id']}"
            f"{'' if storage_url == './runs' else ' --storage ' + storage_url}`"
        )
        raise typer.Exit(code=130 if "SIGINT" in str(summary.get("stopped")) else 143)
    typer.echo(f"run {summary['run_id']}: step {summary.get('step')} ({summary.get('reason')})")
    fit = summary.get("fit")
    if fit:
        typer.echo(
            f"sigmoid fit: A={fit['A']:.3f} [{fit['A_low']:.3f}, {fit['A_high']:.3f}] "
            f"B={fit['B']:.2f} C_mid={fit['C_mid']:.4g} R0={fit['R0']:.3f}; "
            f"final held-out pass rate {fit['final_pass_rate']:.3f}"
        )
        from tasks.scaling import describe_half_run

        if (half_run := describe_half_run(fit)) is not None:
            typer.echo(f"half-run check: {half_run}")
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
    from runtime.common import new_run_id, with_run_id

    cfg = with_run_id(cfg, run_id or cfg.storage.run_id or new_run_id())
    with _guard(), graceful_stop(), run_progress(cfg, cfg.storage.run_id):
        summary = scalerl_run(cfg)
    _print_summary(summary, cfg.storage.url)


@app.command("plan")
def plan_cmd(
    file: ConfigFile = None,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Print where each process of the run goes: its node, CUDA_VISIBLE_DEVICES, trainer ranks,
    and its memory per device by arithmetic from the model's shape (scalerl/placement.py).
    Nothing is started or written; accelerator auto plans for a GPU if one is visible here.
    The plan is for the configured inventory (placement.devices_per_node), not for the GPUs
    found here (`scalerl run` checks those); with CUDA_VISIBLE_DEVICES set, node 0's devices
    are shown as its entries, as the run would start them. No network is needed when the
    model's config.json is in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME, at
    model.revision) or is a known shape; a hub model in neither, with the hub unreachable, is
    refused with one line naming the `hf download` command that fetches it."""
    cfg = _load(file, preset, overrides, check=False)
    from scalerl.placement import (
        make_plan,
        model_shape,
        parent_devices,
        resolve_accelerator,
        short_list_error,
    )

    with _guard():
        acc = resolve_accelerator(cfg)
        shape = model_shape(cfg.model.name_or_path, cfg.model.revision)
        given, short = parent_devices(), None
        if given is not None and len(given) < cfg.placement.devices_per_node:
            # still a plan for the configured inventory, in node-local indices; a run would refuse
            short, given = short_list_error(given, cfg.placement.devices_per_node), None
        plan = make_plan(cfg, shape, accelerator=acc, visible=given)
        if short is not None and acc == "cuda":
            plan.warnings.append(
                f"devices shown as node-local indices; `scalerl run` here refuses: {short}"
            )
    typer.echo(plan.dumps() if as_json else plan.render())


@app.command("resume")
def resume_cmd(
    run_id: RunArg, storage: StorageOpt = "./runs", endpoint_url: EndpointOpt = None
) -> None:
    """Continue a failed or interrupted run from what it committed: shards are not regenerated
    or rescored, the trainer restarts from its checkpoint, the curriculum from its state.

    A finished run is left as it is (one line, exit 0). A run read from another place than the
    one it was started at (moved, or another mount/endpoint) gets its run.json storage section
    pointed at the new place; the rest of the snapshot is never changed. Runs the flow of the
    scalerl-resume deployment (flows/resume.py), as a flow run of that deployment when
    PREFECT_API_URL names a server that has it."""
    from flows.cli_progress import run_progress
    from flows.resume import resume_here
    from runtime.common import resume_config

    with _guard():
        _open_run(storage, endpoint_url, run_id)  # a clear error for an unknown id
        cfg, status = resume_config(run_id, storage, endpoint_url)
        if status.get("state") == "finished":
            typer.echo(
                f"run {run_id} already finished at step {status.get('step')} "
                f"({status.get('reason') or 'no reason recorded'}): nothing to resume, nothing "
                "written. To train further, start a new run (`scalerl run`)."
            )
            return
        with graceful_stop(), run_progress(cfg, run_id):
            summary = resume_here(run_id, storage, endpoint_url)
    _print_summary(summary, storage)


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


@runs_app.command("prune")
def runs_prune(
    run_id: RunArg,
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="Delete (default: a dry run that only prints).")
    ] = False,
    keep_checkpoints: Annotated[
        int | None,
        typer.Option(
            "--keep-checkpoints",
            min=1,
            help="Newest checkpoints to keep (default: the run's weights.keep_checkpoints).",
        ),
    ] = None,
    keep_evaluated: Annotated[
        bool | None,
        typer.Option(
            "--keep-evaluated/--drop-evaluated",
            help="Keep evaluated weight versions (default: the run's weights.keep_evaluated).",
        ),
    ] = None,
) -> None:
    """Free a run's storage: delete weight versions and checkpoints retention does not keep
    (runtime/retention.py; no staleness window once no writer holds the run; live reader leases
    still count).
    A dry run by default: prints what would go and the bytes freed. With --apply it takes the
    run's writer lease first, so it refuses a run that is being written."""
    from runtime.common import config_of_run
    from runtime.retention import apply_plan, prune_plan

    with _guard():
        run = _open_run(storage, endpoint_url, run_id)
        config = config_of_run(storage, run_id, endpoint_url)
        changes = {}
        if keep_checkpoints is not None:
            changes["keep_checkpoints"] = keep_checkpoints
        if keep_evaluated is not None:
            changes["keep_evaluated"] = keep_evaluated
        if changes:
            config = config.model_copy(
                update={"weights": config.weights.model_copy(update=changes)}
            )
        lease = run.acquire_lease({"tool": "scalerl runs prune"}) if apply else None
        try:
            plan = prune_plan(run, config, running=False)
            typer.echo(plan.render())
            if apply:
                freed = apply_plan(run, plan, by="scalerl runs prune")
                typer.echo(f"deleted: {freed:,} bytes freed")
        finally:
            if lease is not None:
                lease.release()
    if not apply:
        typer.echo("dry run: nothing deleted. Fix: run again with --apply to delete.")


@runs_app.command("evals")
def runs_evals(
    run_id: RunArg, storage: StorageOpt = "./runs", endpoint_url: EndpointOpt = None
) -> None:
    """Print a run's evaluation tables: per evaluation set (heldout and evaluation.sets), one
    row per evaluated version with its mean@K / pass@K / maj@K, and the prompts each split kept
    and dropped; the same tables as the run report."""
    from runtime.common import config_of_run
    from tasks.report import evaluation_sets_markdown, prompts_markdown

    with _guard():
        run = _open_run(storage, endpoint_url, run_id)
        config = config_of_run(storage, run_id, endpoint_url)
        set_rows = run.read_metrics("eval_sets").to_pylist()
        prompt_rows = run.read_metrics("prompts").to_pylist()
    typer.echo(
        "\n".join([*prompts_markdown(prompt_rows), "", *evaluation_sets_markdown(config, set_rows)])
    )


@runs_app.command("verify")
def runs_verify(
    run_id: RunArg,
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
    fast: Annotated[
        bool,
        typer.Option(
            "--fast",
            help="Check sizes only: no file is hashed (a file altered at the same size is not "
            "found). Default: every committed shard data file and every checked weights and "
            "checkpoint file is hashed against its recorded sha256.",
        ),
    ] = False,
) -> None:
    """Check a run from its stored data: no committed shard lost, nothing trained twice,
    continuous weight versions, curriculum retirements never undone, every stored file's
    content as recorded (--fast: sizes only). Exit 1 on a problem."""
    from runtime.verify import verify_run

    with _guard():
        report = verify_run(_open_run(storage, endpoint_url, run_id), content=not fast)
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
