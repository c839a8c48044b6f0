"""A run whose directory is deleted while it runs (`rm -rf R/RUN`, issue 30 item 5), through
the real CLI on a tiny-cpu run: the writer's lease heartbeat finds its lease file gone, the flow
stops the run's processes and fails with one `error:` line, and nothing re-creates the run.

One whole run, deleted as soon as the trainer has published a version (the trainer is then in
its shard wait, which waited forever before); the defaults throughout (a heartbeat every 10 s),
so the bound asserted is the one a user gets. On the session's Prefect server (no temporary
one to start)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import process_group_gone

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = Path(sys.executable).parent
ARGS = (
    "--preset tiny-cpu --run-id gone --set schedule.max_steps=400 --set evaluation.every_steps=100"
    " --set data.num_eval_prompts=8 --set generation.prompts_per_batch=4"
)
BOUND_S = 60.0  # the bound: the CLI ends within a minute of the deletion


def test_a_deleted_run_ends_within_a_minute_with_one_line_and_stays_deleted(
    tmp_path, prefect_server
):
    root = tmp_path / "runs"
    env = {k: v for k, v in prefect_server.items() if k != "SCALERL_LEASE"}
    proc = subprocess.Popen(
        [str(BIN / "scalerl"), "run", "--storage", str(root), *ARGS.split()],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    run_dir = root / "gone"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no version 1 within 300 s"
            try:
                if json.loads((run_dir / "weights" / "LATEST").read_text())["weights"] >= 1:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        for _ in range(20):  # writers may create a file while rm walks the tree
            shutil.rmtree(run_dir, ignore_errors=True)
            if not run_dir.exists():
                break
        deleted = time.monotonic()
        try:
            out, err = proc.communicate(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"still running {BOUND_S:.0f} s after the deletion:\n{err[-3000:]}")
        took = time.monotonic() - deleted
        print(f"the CLI ended {took:.1f} s after the deletion")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, err[-3000:]
    assert took < BOUND_S
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: run gone was deleted from {root} while it ran: its writer stops and writes "
        "nothing more (a deleted run is never re-created). Fix: if that was a mistake, restore "
        "the run's directory from a copy and `scalerl resume gone`; otherwise start a new run "
        "(`scalerl run`)."
    ], err[-3000:]
    assert process_group_gone(proc.pid), "processes of the deleted run are still alive"
    assert not run_dir.exists(), sorted(str(p) for p in run_dir.rglob("*"))[:20]
