"""Runs that cannot waste compute, through the real CLI on tiny-cpu runs: Ctrl-C and SIGTERM stop
a run within seconds with a checkpoint and status "stopped", and `scalerl resume` continues it;
two resumes of one run at once: one trains, the other is refused with the holder named; a run
that cannot learn stops as "stalled" with the reason."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.verify import verify_run
from storage import open_store
from tests.e2e.conftest import process_group_gone

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = Path(sys.executable).parent
MAX_STEPS = 60  # the stopped run: stopped near step 4-15, resumed to the end
SMALL = [
    "--set",
    "evaluation.every_steps=100",
    "--set",
    "data.num_eval_prompts=8",
    "--set",
    "generation.prompts_per_batch=4",
]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "SCALERL_LEASE")}
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _scalerl(*args, **kw):
    return subprocess.Popen(
        [str(BIN / "scalerl"), *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives it
        **kw,
    )


def _wait_for_step(run_dir: Path, step: int, proc, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if json.loads((run_dir / "weights" / "LATEST").read_text())["weights"] >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped by Ctrl-C (SIGINT to its process group) after step 4."""
    root = tmp_path_factory.mktemp("stops") / "runs"
    proc = _scalerl(
        "run", "--preset", "tiny-cpu", "--storage", str(root), "--run-id", "ctrl-c",
        "--set", f"schedule.max_steps={MAX_STEPS}", *SMALL,
    )  # fmt: skip
    _wait_for_step(root / "ctrl-c", 4, proc)
    os.killpg(proc.pid, signal.SIGINT)
    asked = time.monotonic()
    out, err = proc.communicate(timeout=120)
    return root, proc, out, err, time.monotonic() - asked


def test_ctrl_c_stops_the_run_cleanly_within_seconds(stopped):
    root, proc, out, err, took = stopped
    assert proc.returncode == 130, err[-3000:]
    assert took < 20, f"the stop took {took:.1f} s"
    run = open_store(str(root)).run("ctrl-c")
    status = run.read_status()
    assert status["state"] == "stopped" and status["reason"] == "stopped by SIGINT"
    # the trainer checkpointed where it stopped: nothing trained is lost
    assert run.latest_checkpoint_step() == status["step"] == run.latest_weights_version()
    assert f"run ctrl-c stopped at step {status['step']}" in out
    assert "scalerl resume ctrl-c" in out
    assert process_group_gone(proc.pid), "processes of the stopped run are still alive"


def test_two_resumes_at_once_one_trains_the_other_is_refused(stopped):
    root = stopped[0]
    run = open_store(str(root)).run("ctrl-c")
    first, second = (_scalerl("resume", "ctrl-c", "--storage", str(root)) for _ in range(2))
    results = [p.communicate(timeout=600) + (p.returncode,) for p in (first, second)]
    codes = sorted(code for _, _, code in results)
    assert codes == [0, 2], [r[1][-2000:] for r in results]
    (refusal,) = [err for _, err, code in results if code == 2]
    (line,) = [x for x in refusal.splitlines() if x.startswith("error: ")]  # one line
    assert line.startswith("error: run ctrl-c is being written by pid "), line
    assert "two writers would train every step twice. Fix: wait for that run to end" in line
    assert run.read_status()["state"] == "finished"
    steps = run.read_metrics("trainer", all_rows=True).column("step").to_pylist()
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))  # every step trained once
    assert verify_run(run).ok


@pytest.mark.parametrize("how", ["sigterm"])
def test_sigterm_stops_the_run_cleanly(tmp_path, how):
    """`timeout` and process managers send SIGTERM to the command alone."""
    root = tmp_path / "runs"
    proc = _scalerl(
        "run", "--preset", "tiny-cpu", "--storage", str(root), "--run-id", "term",
        "--set", "schedule.max_steps=400", *SMALL,
    )  # fmt: skip
    _wait_for_step(root / "term", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    status = open_store(str(root)).run("term").read_status()
    assert status["state"] == "stopped" and status["reason"] == "stopped by SIGTERM"
    assert process_group_gone(proc.pid)


POD_STEPS = 8  # the pod-stop run: stopped after step 2, resumed to the end


def test_sigterm_to_the_process_group_stops_within_the_grace_period(tmp_path):
    """A pod stop (Kubernetes, systemd, `timeout`, `kill -- -PGID`): SIGTERM reaches every process
    of the group at once, the temporary Prefect server and the run's children included. The run
    still stops cleanly within the grace period (default 25 s, SCALERL_STOP_GRACE_S), exit
    128 + SIGTERM, status "stopped" at its newest checkpoint, and resumes to a clean end."""
    grace_s = 25.0  # flows/cli_signals.py DEFAULT_GRACE_S: a pod's SIGKILL comes after 30 s
    root = tmp_path / "runs"
    proc = _scalerl(
        "run", "--preset", "tiny-cpu", "--storage", str(root), "--run-id", "pod",
        "--set", f"schedule.max_steps={POD_STEPS}", *SMALL,
    )  # fmt: skip
    _wait_for_step(root / "pod", 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    asked = time.monotonic()
    try:
        out, err = proc.communicate(timeout=grace_s + 5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no exit {grace_s + 5:g} s after the group's SIGTERM:\n{err[-3000:]}")
    took = time.monotonic() - asked
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert took < grace_s, f"the stop took {took:.1f} s"
    assert process_group_gone(proc.pid), "processes of the stopped run are still alive"
    run = open_store(str(root)).run("pod")
    status = run.read_status()
    assert status["state"] == "stopped", status
    assert status["reason"] == "stopped by SIGTERM", status
    step = status["step"]
    assert 2 <= step < POD_STEPS and run.latest_checkpoint_step() == step, status
    assert "ConnectError" not in err, err[-3000:]  # the temporary server outlived the stop
    # no training after the stop request: the trainer's rows end at the stopped step
    rows = run.read_metrics("trainer", all_rows=True).column("step").to_pylist()
    assert sorted(rows) == list(range(1, step + 1)), rows
    resumed = _scalerl("resume", "pod", "--storage", str(root))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert run.read_status()["state"] == "finished"
    rows = run.read_metrics("trainer", all_rows=True).column("step").to_pylist()
    assert sorted(rows) == list(range(1, POD_STEPS + 1))  # every step trained once
    assert verify_run(run).ok


def test_a_run_that_cannot_learn_stops_as_stalled_with_the_reason(tmp_path):
    """builtin:tiny is untrained: every reward is 0, so no batch makes a trainer step."""
    root = tmp_path / "runs"
    proc = _scalerl(
        "run", "--preset", "tiny-cpu", "--storage", str(root), "--run-id", "stall",
        "--set", "model.name_or_path=builtin:tiny", "--set", "trainer.stall_batches=4",
        "--set", "generation.samples_per_prompt=4", *SMALL,
    )  # fmt: skip
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    # the temporary server's database (run parameters, logs) is the user's alone (issue 30)
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    assert (home / "prefect.db").stat().st_mode & 0o077 == 0, oct(
        (home / "prefect.db").stat().st_mode
    )
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]  # one line
    per_batch = 4 * 4  # prompts_per_batch x samples_per_prompt
    assert line == (
        "error: run stall stalled: no trainer step for 4 batches in a row: every reward in 4 "
        f"batches ({4 * per_batch} completions) was 0; Fix: the policy never solves a prompt: "
        "start from a stronger (e.g. warm-started) model, use easier prompts or more samples "
        "per prompt, and check a few completions with `scalerl rollouts show RUN`."
    )
    status = open_store(str(root)).run("stall").read_status()
    assert status["state"] == "stalled" and status["reason"] in line
    assert process_group_gone(proc.pid)
