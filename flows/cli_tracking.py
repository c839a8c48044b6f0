"""`scalerl runs track RUN`: mirror a run (finished, stopped, or an old one) into its
experiment trackers from the store: a back-fill, one full pass of runtime/tracking/'s mirror.

The trackers are the run's own (its run.json's tracking section) unless --set tracking.* gives
others; progress is the run's markers/tracking.json, so the same tracker runs are continued and
nothing is logged twice, and a second call logs only what is new. It takes the run's writer
lease, so it refuses a run that is being written (that run's flow mirrors it itself)."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli_common import EndpointOpt, RunArg, StorageOpt, _fail, _guard, _open_run

TrackSetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Tracking override, e.g. tracking.mlflow.tracking_uri=http://127.0.0.1:5000 or "
        "tracking.tensorboard={} (repeatable; only tracking.* fields).",
    ),
]


class _Echo:
    """The mirror's log, as CLI lines on stderr."""

    def _say(self, msg, *args) -> None:
        typer.echo(" ".join((msg % args if args else msg).split()), err=True)

    warning = info = _say

    def debug(self, msg, *args) -> None:
        pass


def tracking_of(config, overrides: list[str]) -> dict:
    """The tracking section `config` (a RunConfig) has after `overrides` (tracking.* only)."""
    from scalerl.config import apply_overrides, validate_config

    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith("tracking."):
            raise ValueError(
                f"--set {item.split('=', 1)[0]} is not a tracking field; a back-fill changes "
                "nothing else of the run. Fix: give tracking.* fields only (e.g. "
                "tracking.mlflow.tracking_uri=URL)."
            )
    data = apply_overrides(config.model_dump(mode="json"), overrides)
    return validate_config(data).tracking.model_dump(mode="json")


def runs_track(
    run_id: RunArg,
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
    overrides: TrackSetOpt = None,
) -> None:
    """Back-fill a run into its experiment trackers (MLflow, TensorBoard, W&B) from the store:
    its config as parameters (secrets redacted), trainer metrics per step, evaluations per
    version, fits, plots, completion samples and its status. Continues the tracker runs the
    run already logged to and logs nothing twice. Exit 1 when a tracker could not take it all."""
    from runtime.common import config_of_run
    from runtime.tracking import TrackerMirror
    from runtime.tracking.sinks import make_sinks
    from scalerl.config import ConfigError

    with _guard():
        run = _open_run(storage, endpoint_url, run_id)
        config = config_of_run(storage, run_id, endpoint_url)
        try:
            tracking = tracking_of(config, overrides or [])
        except ConfigError as exc:
            _fail(exc)
        if not any(tracking.values()):
            raise ValueError(
                f"run {run_id} has no tracker in its tracking section. Fix: name one, e.g. "
                "--set tracking.mlflow.tracking_uri=http://127.0.0.1:5000, "
                "--set tracking.tensorboard={} or --set tracking.wandb.project=NAME."
            )
        # (ValueError, one line: a setting a sink needs is missing) before anything is written
        sinks = make_sinks(tracking, run_id, run.url if run.is_local else None)
        lease = run.acquire_lease({"tool": "scalerl runs track"})  # refuses a run being written
        try:
            mirror = TrackerMirror(
                run, run.read_config(), tracking=tracking, logger=_Echo(), sinks=sinks
            )
            behind = mirror.stop()  # never started: one full pass, the status, sinks closed
            sinks = run.read_marker("tracking") or {}
        finally:
            lease.release()
    for name, n in behind.items():
        ident = (sinks.get("sinks", {}).get(name) or {}).get("id")
        where = f" (run id {ident})" if ident else ""
        typer.echo(f"{name}{where}: " + ("up to date" if not n else f"{n} points not logged"))
    if any(behind.values()):
        raise typer.Exit(code=1)
