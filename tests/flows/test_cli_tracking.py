"""`scalerl doctor -c/--set tracking.*` checks the configured trackers, one line each."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from flows.cli import app


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_doctor_checks_each_configured_tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{_closed_port()}/api")
    url = f"http://127.0.0.1:{_closed_port()}"
    result = CliRunner().invoke(
        app,
        ["doctor", "--storage", str(tmp_path / "runs"),
         "--set", f"tracking.mlflow.tracking_uri={url}", "--set", "tracking.tensorboard={}",
         "--set", "tracking.wandb.project=p", "--set", "tracking.wandb.mode=offline"],
    )  # fmt: skip
    lines = result.stdout.splitlines()
    mlflow = [line for line in lines if " MLflow: " in line]
    assert len(mlflow) == 1 and mlflow[0].startswith("warn") and "does not answer" in mlflow[0]
    assert "Fix:" in mlflow[0]  # a tracker that is down is a warning: the run goes on
    (tb,) = [line for line in lines if " TensorBoard: " in line]
    assert tb.startswith("ok") and "RUN/tensorboard" in tb
    (wb,) = [line for line in lines if " W&B: " in line]
    assert wb.startswith("ok") and "mode offline" in wb
    assert result.exit_code == 2  # (the Prefect API on a closed port is the one failure)
    assert sum(line.startswith("fail") for line in lines) == 1
