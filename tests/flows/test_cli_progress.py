"""`scalerl run` progress bars follow the run store: steps = newest weight version, shards, evals."""

import sys
import time

from flows.cli_progress import run_progress
from scalerl.config import load_config
from scalerl.models import build_tiny_model
from storage import open_store


def test_bars_follow_the_store_on_a_terminal(tmp_path, monkeypatch):
    cfg = load_config(preset="tiny-cpu", overrides=[f"storage.url={tmp_path / 'runs'}"])
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    with run_progress(cfg, "progress-run", poll_s=0.1) as bars:
        assert bars is not None
        run = open_store(str(tmp_path / "runs")).run("progress-run", create=True)
        weights = build_tiny_model(tmp_path / "w")
        for version in (0, 1, 2):
            run.publish_weights(version, weights)
        deadline = time.monotonic() + 10
        while bars.tasks[0].completed != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bars.tasks[0].completed == 2
        assert bars.tasks[0].total == cfg.schedule.max_steps


def test_no_bars_when_not_a_terminal(tmp_path, monkeypatch):
    cfg = load_config(preset="tiny-cpu", overrides=[f"storage.url={tmp_path / 'runs'}"])
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    with run_progress(cfg, "x") as bars:
        assert bars is None
