"""A pod stop (SIGTERM to the whole process group) reaching the run's processes, on real forked
children (runtime/isolated.py) and a real local store: the children and their fork server outlive
the signal (the flow process stops them in order, through the run's status), and a stop past its
grace period (flows.run.hard_stop) kills them and marks the run "stopped" at its newest
checkpoint. The whole-CLI pod stop is tests/e2e/test_stops.py."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from runtime.isolated import reopen_children, run_isolated
from scalerl.config import load_config
from storage import open_store


def sleeping_target(config, pid_file: str, seconds: float) -> dict:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return {"pid": os.getpid(), "slept": seconds}


def _config(tmp_path):
    return load_config(preset="tiny-cpu", overrides=[f"storage.url={tmp_path}"])


def _start(tmp_path, seconds: float):
    """sleeping_target in an isolated child, supervised from a thread: (pid, thread, outcome)."""
    pid_file, outcome = tmp_path / "child.pid", {}

    def supervise() -> None:
        try:
            outcome["ok"] = run_isolated(
                "test_isolated_stops:sleeping_target",
                _config(tmp_path),
                "trainer",
                pid_file=str(pid_file),
                seconds=seconds,
            )
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome["error"] = exc

    thread = threading.Thread(target=supervise, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.05)
    return int(pid_file.read_text()), thread, outcome


def _fork_server_pid() -> int:
    from multiprocessing import forkserver

    return forkserver._forkserver._forkserver_pid


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether `pid` has exited (a zombie not yet reaped counts) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while _state(pid) != "Z":
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # gone
        return "Z"


def test_a_child_and_its_fork_server_outlive_a_group_sigterm(tmp_path):
    """What a pod stop sends every process of the group: the trainer finishes what it does (its
    parent stops it through the run's status) instead of dying and being retried."""
    pid, thread, outcome = _start(tmp_path, seconds=2.0)
    server = _fork_server_pid()
    os.kill(pid, signal.SIGTERM)  # (the group itself holds pytest: each gets it on its own)
    os.kill(server, signal.SIGTERM)
    thread.join(60)
    assert outcome.get("ok") == {"pid": pid, "slept": 2.0}, outcome
    assert not _gone(server, timeout=0.5), "the fork server died of SIGTERM"


def test_a_stop_past_its_grace_period_kills_the_children_and_marks_the_run_stopped(tmp_path):
    import flows.run
    from flows.run import hard_stop
    from runtime.writer import hold_run

    run = open_store(str(tmp_path)).run("hard", create=True)
    run.write_status({"state": "stopping", "reason": "stopped by SIGTERM"})
    for step in (2, 4):  # committed checkpoints: the newest is what a resume continues from
        ckpt = tmp_path / f"ckpt-{step}"
        ckpt.mkdir()
        (ckpt / "model.bin").write_bytes(bytes(step))
        run.save_checkpoint(step, ckpt)
    writer = hold_run(run, "flow-run-1")
    flows.run._writing.append((run, writer))
    try:
        pid, thread, outcome = _start(tmp_path, seconds=600.0)  # a stop that would not end
        asked = time.monotonic()
        status = hard_stop("stopped by SIGTERM (the clean stop took over 25 s)")
        took = time.monotonic() - asked
        assert _gone(pid, timeout=0.0), "the child outlived hard_stop"
        thread.join(30)
        assert "error" in outcome  # its supervising task ended: the run's process can exit
    finally:
        flows.run._writing.clear()
        writer.release()
        reopen_children()
    assert took < 5, f"hard_stop took {took:.1f} s"
    reason = "stopped by SIGTERM (the clean stop took over 25 s)"
    assert status == {"state": "stopped", "reason": reason, "step": 4, "run_id": "hard"}
    assert run.read_status() == {"state": "stopped", "reason": reason, "step": 4}
    assert run.latest_checkpoint_step() == 4  # intact, and what `scalerl resume` loads
    hold_run(run, "flow-run-2").release()  # the lease was freed: a resume holds it at once
