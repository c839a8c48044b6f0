"""Tracker sinks: MLflow, TensorBoard, Weights & Biases, behind one small protocol.

Each sink imports its library lazily (only when the config names it) and is only ever called
from the mirror's thread (runtime/tracking/mirror.py), never from a trainer or a generator.

    sink.open(state)                 -> state: starts or CONTINUES the tracker run whose id
                                        `state` holds (MLflow run_id, W&B id + resume="allow",
                                        TensorBoard the same log dir, purged past the last
                                        step the mirror recorded as logged)
    sink.log_params(params)             the flattened, redacted config (once per tracker run)
    sink.log_metrics(axis, step, values, wall_time)  values {name: float} at `step` of `axis` (trainer
                                        step, eval version, fit number)
    sink.log_image(name, png, step)     a plot (PNG bytes); the latest replaces the last
    sink.log_table(name, rows, step)    a small table (completion samples)
    sink.set_status(state)              the run's final state (finished, stopped, failed...)
    sink.close()
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Protocol

# MLflow's HTTP client retries a request up to 7 times with backoff (minutes) by default; the
# mirror retries on its own schedule, so one failed request is one failed pass.
_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class Sink(Protocol):
    name: str  # mlflow, tensorboard, wandb
    where: str  # its destination: progress is kept per (name, where)

    def open(self, state: dict) -> dict: ...
    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(
        self, axis: str, step: int, values: dict[str, float], wall_time: float | None = None
    ) -> None: ...
    def log_image(self, name: str, png: bytes, step: int) -> None: ...
    def log_table(self, name: str, rows: list[dict], step: int) -> None: ...
    def set_status(self, state: str) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        raise ValueError("not a PNG image")
    return struct.unpack(">II", png[16:24])


def _artifacts_beside(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the database for a sqlite:/// store
    (MLflow's default is ./mlruns under whatever directory the process runs in); the server's
    or file store's own default otherwise (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_absolute():
        db = Path.cwd() / db
    return (db.parent / "mlartifacts").as_uri()


class MlflowSink:
    name = "mlflow"
    fix = (
        "check tracking.mlflow.tracking_uri (is the server up? `scalerl doctor -c CONFIG` "
        "checks it) and its credentials (MLFLOW_TRACKING_* variables)"
    )

    def __init__(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        self.uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.where = f"{tracking_uri} experiment {experiment}"
        self.client = self.run_id = None
        self._pending: list = []

    def open(self, state: dict) -> dict:
        for k, v in _MLFLOW_ENV.items():
            os.environ.setdefault(k, v)
        if "://" not in self.uri or self.uri.startswith("file:"):
            # a local directory: MLflow 3 keeps its file store in maintenance mode and refuses
            # it unless asked; the config documents it as a choice, so it is asked for here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        if state.get("id"):
            self.run_id = state["id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return state
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else self.client.create_experiment(
                self.experiment, artifact_location=_artifacts_beside(self.uri)
            )
        )
        run = self.client.create_run(
            exp_id, run_name=self.run_name, tags={"scalerl.run_id": self.run_name}
        )
        self.run_id = run.info.run_id
        return {**state, "id": self.run_id, "experiment_id": exp_id}

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(
        self, axis: str, step: int, values: dict[str, float], wall_time: float | None = None
    ) -> None:
        from mlflow.entities import Metric

        # the row's own time (mirror.stream_points): the same point logged again is the same
        # (key, value, step, timestamp), which MLflow's store keeps once
        now = int((time.time() if wall_time is None else wall_time) * 1000)
        self._pending += [Metric(k, v, now, step) for k, v in values.items()]
        if len(self._pending) >= 900:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch = self._pending[:1000]  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch)
            del self._pending[: len(batch)]

    def log_image(self, name: str, png: bytes, step: int) -> None:
        with tempfile.TemporaryDirectory(prefix="scalerl-mlflow-") as tmp:
            path = Path(tmp) / f"{name}.png"
            path.write_bytes(png)
            self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        columns = list(rows[0]) if rows else []
        data = {c: [r.get(c) for r in rows] for c in columns}
        self.client.log_table(self.run_id, data=data, artifact_file=f"completions/{name}.json")

    def set_status(self, state: str) -> None:
        self.flush()
        self.client.set_tag(self.run_id, "scalerl.status", state)
        ended = {"finished": "FINISHED", "failed": "FAILED", "stalled": "FAILED"}
        self.client.set_terminated(self.run_id, ended.get(state, "KILLED"))

    def close(self) -> None:
        self.client = None
        self._pending = []


class TensorBoardSink:
    name = "tensorboard"
    fix = "check tracking.tensorboard.log_dir: a writable local directory with free space"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = self.where = log_dir
        self.writer = None

    def open(self, state: dict) -> dict:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(self.log_dir)
        purge = state.get("purge_step")
        if purge is not None:
            # TensorBoard's readers drop every event at or after this step written before it:
            # what an earlier process logged past its last recorded progress is not doubled.
            self.writer.add_event(
                event_pb2.Event(
                    wall_time=time.time(),
                    step=int(purge),
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
                )
            )
        return state

    def _summary(self, value, step: int, wall_time: float | None = None) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        self.writer.add_event(
            event_pb2.Event(
                wall_time=time.time() if wall_time is None else wall_time,
                step=int(step),
                summary=summary_pb2.Summary(value=value),
            )
        )

    def log_params(self, params: dict[str, str]) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        lines = ["| parameter | value |", "|---|---|"]
        lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in sorted(params.items())]
        self._summary(text_pb("config", "\n".join(lines)).value, 0)

    def log_metrics(
        self, axis: str, step: int, values: dict[str, float], wall_time: float | None = None
    ) -> None:
        from tensorboard.compat.proto import summary_pb2

        self._summary(
            [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()],
            step,
            wall_time,
        )

    def log_image(self, name: str, png: bytes, step: int) -> None:
        from tensorboard.compat.proto import summary_pb2

        width, height = png_size(png)
        image = summary_pb2.Summary.Image(
            height=height, width=width, colorspace=4, encoded_image_string=png
        )
        self._summary([summary_pb2.Summary.Value(tag=f"plots/{name}", image=image)], step)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        columns = list(rows[0]) if rows else []
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in rows:
            cells = [" ".join(str(r.get(c)).split()).replace("|", "/") for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        self._summary(text_pb(f"completions/{name}", "\n".join(lines)).value, step)

    def set_status(self, state: str) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._summary(text_pb("status", state).value, 0)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    name = "wandb"
    # wandb-core buffers the run's file (and what it streams online) until finish(): points
    # logged before a SIGKILL are lost, so the mirror records W&B's progress at close only
    durable_on_log = False
    fix = (
        "check tracking.wandb (project, entity, mode) and WANDB_API_KEY for online mode "
        "(`scalerl doctor -c CONFIG` checks it), or set tracking.wandb.mode=offline"
    )

    def __init__(self, cfg: dict, run_name: str, run_dir: str | None) -> None:
        self.cfg, self.run_name, self.dir = cfg, run_name, run_dir
        self.where = f"{cfg.get('entity') or '-'}/{cfg['project']}"
        self.run = None
        self._axes: set[str] = set()
        self._tables: dict = {}

    def open(self, state: dict) -> dict:
        import uuid

        import wandb

        run_id = state.get("id") or uuid.uuid4().hex[:12]
        if self.dir:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.cfg["project"],
            entity=self.cfg.get("entity"),
            mode=self.cfg.get("mode", "online"),
            group=self.cfg.get("group"),
            tags=self.cfg.get("tags") or None,
            name=self.run_name,
            id=run_id,
            resume="allow",
            dir=self.dir,
            reinit="create_new",
            save_code=False,
            settings=wandb.Settings(
                # what the tracker gets is what the mirror logs: no environment, command line,
                # code, git state or console of the flow process
                x_disable_meta=True,
                x_disable_stats=True,
                x_disable_machine_info=True,
                disable_git=True,
                disable_code=True,
                console="off",
                silent=True,
            ),
        )
        return {**state, "id": run_id}

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(
        self, axis: str, step: int, values: dict[str, float], wall_time: float | None = None
    ) -> None:
        # one x axis per stream (trainer/step, eval/version, ...): W&B's own step must only
        # grow, and the streams interleave (wall_time unused: W&B stamps its own _timestamp)
        x = f"{axis}/x"
        if axis not in self._axes:
            self.run.define_metric(x)
            self.run.define_metric(f"{axis}/*", step_metric=x)
            self._axes.add(axis)
        self.run.log({x: step, **values})

    def log_image(self, name: str, png: bytes, step: int) -> None:
        import wandb
        from PIL import Image

        self.run.log({f"plots/{name}": wandb.Image(Image.open(io.BytesIO(png)))})

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        import wandb

        columns = list(rows[0]) if rows else []
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        self.run.log({f"completions/{name}": table})

    def set_status(self, state: str) -> None:
        self.run.summary["scalerl/status"] = state
        self.run.tags = tuple(t for t in self.run.tags if not t.startswith("status:")) + (
            f"status:{state}",
        )

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def make_sinks(tracking: dict, run_id: str, run_dir: str | None) -> list:
    """The sinks the config's tracking section (a dict, as in run.json) names. `run_dir`: the
    run's local directory (None for a remote store), where TensorBoard's events go by default.
    ValueError (one line, with the fix) when a sink needs a setting it does not have."""
    sinks: list = []
    mlflow = tracking.get("mlflow")
    if mlflow:
        sinks.append(
            MlflowSink(
                mlflow["tracking_uri"],
                mlflow.get("experiment") or "scalerl",
                mlflow.get("run_name") or run_id,
            )
        )
    tb = tracking.get("tensorboard")
    if tb is not None:
        log_dir = tb.get("log_dir")
        if log_dir:
            log_dir = str(Path(log_dir).expanduser() / run_id)
        elif run_dir is not None:
            log_dir = str(Path(run_dir) / "tensorboard")
        else:
            raise ValueError(
                "tracking.tensorboard.log_dir is unset and the run store is not local, so the "
                "event files have no default place. Fix: set tracking.tensorboard.log_dir to a "
                "local directory."
            )
        sinks.append(TensorBoardSink(log_dir))
    wandb = tracking.get("wandb")
    if wandb and wandb.get("mode") != "disabled":
        sinks.append(WandbSink(wandb, run_id, os.environ.get("WANDB_DIR")))
    return sinks
