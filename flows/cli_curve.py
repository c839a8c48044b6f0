"""`scalerl curve fit|plot`: the ScaleRL compute curve of a run."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import (
    EndpointOpt,
    RunArg,
    StageOpt,
    StorageOpt,
    _guard,
    _ident,
    _jsonable,
    _open_run,
    _query,
)

curve_app = typer.Typer(help="The ScaleRL compute curve of a run.", no_args_is_help=True)


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
    from storage.errors import StoreError

    with contextlib.suppress(StoreError, KeyError, TypeError):  # no or foreign snapshot
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
        from scalerl.scaling import predict_sigmoid

        C = [c for c in compute if c > 0]
        R = [r for c, r in zip(compute, rate, strict=True) if c > 0]
        with _guard():
            pred = predict_sigmoid(C, R, target_compute, R0=fit.R0, exclude_fraction=0.0)
        out |= {
            "target_compute": target_compute,
            "prediction": pred.value,
            "prediction_low": pred.low,
            "prediction_high": pred.high,
            "prediction_confidence": pred.confidence,
        }
    if as_json:
        typer.echo(json.dumps(_jsonable(out)))
        return
    lo, hi = fit.A_interval
    typer.echo(f"A     = {fit.A:.4f}  (90% bootstrap interval [{lo:.4f}, {hi:.4f}])")
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
        typer.echo(
            f"predicted pass rate at {target_compute:.6g} {unit}: {out['prediction']:.4f} "
            f"[{out['prediction_low']:.4f}, {out['prediction_high']:.4f}] (90% prediction "
            "interval for one evaluation there)"
        )


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
        # a fresh sibling created with mode 0o666 so the kernel applies the umask, as for any
        # file the user asks for (mkstemp would leave 0o600); renamed over `output` when drawn
        tmp = output.parent / f".tmp-{uuid.uuid4().hex[:12]}-{output.name}"
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            draw(plots, tmp)
            os.replace(tmp, output)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    typer.echo(f"wrote {output}")


def _plot_data(run, kind: str, stage: str | None, target_compute: float | None):
    """Read what the plot needs; return draw(plots_module, path)."""
    from storage.errors import StoreError

    config = {}
    with contextlib.suppress(StoreError):  # no snapshot: plot without the config's marks
        config = run.read_config()
    if kind == "curve":
        compute, rate, fit = _fit_run(run, bootstrap=100)
        unit = _compute_unit(run)
        # the run's own half-run check (tasks/scaling.py) once it has ended: its last row
        scaling = run.read_metrics("scaling").to_pylist()
        half_run = scaling[-1] if scaling and scaling[-1].get("compute") == compute[-1] else None
        return lambda p, path: p.plot_curve(
            compute, rate, fit, path, target_compute=target_compute, compute_unit=unit,
            title=f"{run.run_id}: held-out pass rate vs compute", half_run=half_run,
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
