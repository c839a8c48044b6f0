"""A whole tiny-cpu run mirrored to three real trackers at once: an MLflow tracking server the
test starts on 127.0.0.1 (SQLite backend, artifacts served by it), TensorBoard event files and
W&B in offline mode (its own directory, no network). The run is SIGKILLed mid-way and resumed;
the MLflow server is stopped while the resumed run trains. The run must finish regardless, say
so in its log with the fix, verify clean, and `scalerl runs track` must then back-fill what the
dead server missed into the SAME MLflow run, one value per trainer step. Everything is read back
with the trackers' own readers (MlflowClient, EventAccumulator, wandb's protobuf records) and
checked against the run store; a secret planted in the environment appears in none of them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.verify import verify_run
from storage import open_store
from tests.e2e.conftest import free_port, wait_healthy
from tests.runtime.test_tracking import wandb_history

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SECRET = "PLANTED-e2e-s3cr3t-4Vq9"
SCRIPT = """
import sys
from scalerl.config import load_config
from flows.run import scalerl_run
if __name__ == "__main__":
    root, run_id, mlflow_uri = sys.argv[1:4]
    cfg = load_config(preset="tiny-cpu", overrides=[
        f"storage.url={root}", f"storage.run_id={run_id}", "schedule.max_steps=12",
        "trainer.checkpoint_every=2", "evaluation.every_steps=4", "data.num_eval_prompts=8",
        f"tracking.mlflow.tracking_uri={mlflow_uri}", "tracking.mlflow.experiment=e2e",
        "tracking.tensorboard={}", "tracking.wandb.project=e2e", "tracking.wandb.mode=offline"])
    scalerl_run(cfg)
"""


class MlflowServer:
    """`mlflow server` on a fixed port over one SQLite file: stopped and started again, it
    serves the same runs."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        self.root.mkdir(exist_ok=True)
        log = open(self.root / "server.log", "a")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
        )  # fmt: skip
        wait_healthy(f"{self.url}/health", self.proc, self.root / "server.log", "mlflow server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    yield server
    server.stop()


def _wait(what: str, proc, cond, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}")
        try:
            got = cond()
            if got:
                return got
        except Exception:  # noqa: BLE001 - the store or the tracker is not there yet
            pass
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}")


def test_a_run_in_three_trackers_survives_a_kill_and_a_dead_server(
    prefect_server, mlflow_server, tmp_path
):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, run_id = tmp_path / "runs", "tracked"
    wandb_dir = tmp_path / "wandb"
    env = {
        **prefect_server,
        "SCALERL_TRACKING_INTERVAL_S": "1",
        "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "AWS_SECRET_ACCESS_KEY": SECRET,  # planted: it must reach no tracker
        "PREFECT_LOGGING_LEVEL": "INFO",
    }  # fmt: skip
    logs = [tmp_path / "first.log", tmp_path / "resumed.log"]

    def start(log: Path):
        with open(log, "w") as out:
            return subprocess.Popen(
                [sys.executable, "-c", SCRIPT, str(root), run_id, mlflow_server.url],
                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    client = MlflowClient(tracking_uri=mlflow_server.url)

    def mlflow_steps(run_uuid: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_uuid, "trainer/loss"))

    def mlflow_id() -> str | None:
        marker = open_store(str(root)).run(run_id).read_marker("tracking") or {}
        ids = [s.get("id") for s in marker.get("sinks", {}).values() if s["sink"] == "mlflow"]
        return ids[0] if ids else None

    # 1. the run mirrors as it trains; SIGKILL once MLflow has two steps and a checkpoint exists
    proc = start(logs[0])
    first_id = _wait("MLflow's run id is in the run", proc, mlflow_id)
    run = open_store(str(root)).run(run_id)
    _wait(
        "two steps in MLflow and a checkpoint",
        proc,
        lambda: len(mlflow_steps(first_id)) >= 2 and (run.latest_checkpoint_step() or 0) >= 2,
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before_kill = {m.step: m.value for m in client.get_metric_history(first_id, "trainer/loss")}

    # 2. resumed; the MLflow server dies while it trains: the run goes on and finishes
    proc = start(logs[1])
    resumed_at = time.time()
    _wait(
        "the resumed trainer's first step",
        proc,
        lambda: max(run.read_metrics("trainer").column("time").to_pylist()) > resumed_at,
    )
    mlflow_server.stop()
    assert proc.wait(timeout=600) == 0, logs[1].read_text()[-3000:]
    log = logs[1].read_text()
    failed = [line for line in log.splitlines() if "tracking: mlflow failed" in line]
    assert failed and "Fix:" in failed[0], log[-3000:]
    assert run.read_status()["state"] == "finished"
    report = verify_run(run)
    assert report.ok, report.problems

    # 3. the server is back: `scalerl runs track` back-fills into the same MLflow run
    mlflow_server.start()
    track = subprocess.run(
        [str(BIN / "scalerl"), "runs", "track", run_id, "--storage", str(root)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert track.returncode == 0, track.stdout + track.stderr
    assert mlflow_id() == first_id

    trainer = run.read_metrics("trainer").to_pylist()
    store_steps = sorted(r["step"] for r in trainer)
    assert store_steps[-1] == 12
    loss = {r["step"]: r["loss"] for r in trainer}
    evals = sorted(r["version"] for r in run.read_metrics("eval").to_pylist())
    assert len(evals) >= 2

    # MLflow: one run (the first one, continued), every trainer step once
    exp = client.get_experiment_by_name("e2e")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [first_id]
    history = client.get_metric_history(first_id, "trainer/loss")
    assert sorted(m.step for m in history) == store_steps
    for m in history:  # a step redone after the kill keeps the value logged before it
        assert m.value == pytest.approx(before_kill.get(m.step, loss[m.step]))
    pass_rates = client.get_metric_history(first_id, "eval/pass_rate")
    assert sorted(m.step for m in pass_rates) == evals
    assert sorted(m.step for m in client.get_metric_history(first_id, "eval/pass_rate_se")) == evals
    finished = client.get_run(first_id)
    assert finished.data.params["schedule.max_steps"] == "12"
    assert finished.data.tags["scalerl.status"] == "finished"
    plots = {a.path for a in client.list_artifacts(first_id, "plots")}
    assert "plots/curve.png" in plots
    tables = {a.path for a in client.list_artifacts(first_id, "completions")}
    assert len(tables) == len(evals)

    # TensorBoard (the run's own directory): each trainer step once, the plots as images
    acc = EventAccumulator(str(root / run_id / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("trainer/loss")] == store_steps
    assert [e.step for e in acc.Scalars("eval/pass_rate")] == evals
    assert acc.Images("plots/curve")

    # W&B offline: every trainer step and evaluation in its history, the final status
    rows = wandb_history(wandb_dir)
    assert sorted({r["trainer/x"] for r in rows if "trainer/x" in r}) == store_steps
    assert sorted({r["eval/x"] for r in rows if "eval/x" in r}) == evals

    for where in (mlflow_server.root, root / run_id / "tensorboard", wandb_dir, *logs):
        paths = [where] if where.is_file() else [p for p in where.rglob("*") if p.is_file()]
        for path in paths:
            assert SECRET.encode() not in path.read_bytes(), path
