"""runtime/isolated.py: task bodies in their own processes (forked from a fork server).

The targets below run in the child; they are found there by module name (this file's directory
is on sys.path under pytest, and the child gets the parent's sys.path).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtime.isolated import IsolatedTaskError, in_process, run_isolated
from scalerl.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def echo_target(config, value: int) -> dict:
    logging.getLogger("scalerl.test").info("child %d says %d", os.getpid(), value)
    return {"pid": os.getpid(), "value": value * 2, "url": config.storage.url}


def failing_target(config) -> dict:
    raise ConfigError("generation.max_new_tokens = 0 is too small. Fix: set it to >= 1.")


def dying_target(config) -> dict:
    logging.getLogger("scalerl.test").info("about to die")
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def threads_target(config) -> dict:
    import torch

    return {"threads": torch.get_num_threads()}


def waking_target(config, timeout: float) -> dict:
    from runtime.isolated import wait_for_wake

    logging.getLogger("scalerl.test").info("waiting")
    t0 = time.monotonic()
    woken = wait_for_wake(timeout)
    return {"woken": woken, "waited": time.monotonic() - t0}


def _config(tmp_path, *overrides):
    return load_config(preset="tiny-cpu", overrides=[f"storage.url={tmp_path}", *overrides])


def test_child_runs_in_its_own_process_and_logs_reach_the_parent(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        "runtime.isolated.task_logger",
        lambda: type("L", (), {"log": lambda _, *a: seen.append(a)})(),
    )
    out = run_isolated("test_isolated:echo_target", _config(tmp_path), "echo", value=21)
    assert out["value"] == 42 and out["url"] == str(tmp_path)
    assert out["pid"] != os.getpid()
    assert (logging.INFO, f"child {out['pid']} says 21") in seen  # relayed to the task's log


def test_error_comes_back_as_the_same_class_and_message(tmp_path):
    with pytest.raises(ConfigError, match=r"max_new_tokens = 0 is too small\. Fix: set it"):
        run_isolated("test_isolated:failing_target", _config(tmp_path), "failing")


def test_a_killed_child_raises_with_its_status_and_last_lines(tmp_path):
    with pytest.raises(IsolatedTaskError, match=r"(?s)exit status -9.*about to die"):
        run_isolated("test_isolated:dying_target", _config(tmp_path), "dying")


def test_torch_threads_setting_applies_in_the_child(tmp_path):
    one = run_isolated("test_isolated:threads_target", _config(tmp_path), "threads")
    assert one["threads"] == 1  # the tiny-cpu preset
    two = run_isolated(
        "test_isolated:threads_target", _config(tmp_path, "pipeline.torch_threads=2"), "threads"
    )
    assert two["threads"] == 2


def test_memory_store_and_thread_isolation_run_in_process(tmp_path):
    memory = load_config(preset="tiny-cpu", overrides=["storage.url=memory://iso-test"])
    assert in_process(memory)
    assert run_isolated("test_isolated:echo_target", memory, "echo", value=1)["pid"] == os.getpid()
    threaded = _config(tmp_path, "pipeline.isolation=thread")
    assert run_isolated("test_isolated:echo_target", threaded, "x", value=1)["pid"] == os.getpid()


def _script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "user_script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
            from scalerl.config import load_config
            from runtime.isolated import run_isolated
            config = load_config(preset="tiny-cpu", overrides=["storage.url={tmp_path}"])
            """
        )
        + textwrap.dedent(body)
    )
    return script


def test_an_unguarded_user_script_is_not_run_again_in_the_child(tmp_path):
    # multiprocessing re-imports the caller's __main__ in its children by default; a script
    # without an `if __name__ == "__main__"` guard would then start its run again there.
    marker = tmp_path / "imports.txt"
    script = _script(
        tmp_path,
        f"""
        with open({str(marker)!r}, "a") as f:
            f.write("imported\\n")
        print(run_isolated("test_isolated:echo_target", config, "echo", value=2)["value"])
        """,
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "4"
    assert marker.read_text().splitlines() == ["imported"]


def test_a_kill_point_in_the_child_kills_the_flow_process_too(tmp_path):
    # scalerl/faults.py: a crash at a generator's or the trainer's seam is a whole-node loss
    script = _script(
        tmp_path,
        """
        from scalerl.faults import kill_point
        import test_isolated
        run_isolated("test_isolated:chaos_target", config, "chaos")
        print("parent survived")
        """,
    )
    env = {**os.environ, "SCALERL_CHAOS": "trainer.after_step:1"}
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == -signal.SIGKILL, (out.returncode, out.stdout, out.stderr)
    assert "parent survived" not in out.stdout


def chaos_target(config) -> dict:
    from scalerl.faults import kill_point

    kill_point("trainer.after_step")
    return {"survived": True}


def nice_target(config) -> dict:
    return {"nice": os.nice(0)}


def test_nice_lowers_the_childs_cpu_priority_and_leaves_the_parents(tmp_path):
    """evaluation.nice: an evaluation process yields CPU to the generators and the trainer."""
    before = os.nice(0)
    out = run_isolated("test_isolated:nice_target", _config(tmp_path), "nice", nice=7)
    assert out["nice"] == min(before + 7, 19)
    assert run_isolated("test_isolated:nice_target", _config(tmp_path), "nice")["nice"] == before
    assert os.nice(0) == before


def sleeping_target(config, seconds: float) -> dict:
    logging.getLogger("scalerl.test").info("pid %d", os.getpid())
    time.sleep(seconds)
    return {}


def test_a_child_past_its_timeout_is_killed_and_the_caller_gets_timeout_error(
    tmp_path, monkeypatch
):
    seen = []
    monkeypatch.setattr(
        "runtime.isolated.task_logger",
        lambda: type("L", (), {"log": lambda _, *a: seen.append(a)})(),
    )
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"sleepy process did not finish within 1 s\. Fix"):
        run_isolated(
            "test_isolated:sleeping_target", _config(tmp_path), "sleepy", timeout_s=1.0, seconds=60
        )
    assert time.monotonic() - start < 30
    (pid,) = [int(m.split()[1]) for _, m in seen if m.startswith("pid ")]
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


def test_a_dead_parent_not_yet_reaped_counts_as_gone():
    """An isolated child watches its flow process with _alive: a SIGKILLed parent that nobody
    has reaped yet (a zombie) still answers kill(pid, 0), and the child must exit all the same."""
    from runtime.isolated import _alive

    proc = subprocess.Popen(["sleep", "60"])
    try:
        assert _alive(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the killed process never became a zombie"
            time.sleep(0.01)
        assert not _alive(proc.pid)  # a zombie: not reaped (no wait() yet), but gone
    finally:
        proc.wait()
    assert not _alive(proc.pid)  # reaped: no such process


def test_children_start_under_a_temp_dir_too_long_for_a_unix_socket(tmp_path):
    # A worker's job directory as TMPDIR: the fork server's AF_UNIX socket path would pass
    # 107 bytes ("AF_UNIX path too long"); its temp dir goes to a short system one instead.
    long_tmp = tmp_path / ("x" * 60) / ("y" * 60)
    long_tmp.mkdir(parents=True)
    script = _script(
        tmp_path,
        """
        print(run_isolated("test_isolated:echo_target", config, "echo", value=3)["value"])
        """,
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(long_tmp)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "6"


def test_notify_children_wakes_a_child_started_with_wake(tmp_path, monkeypatch):
    """The flow wakes its trainer child when the stages commit a filtered shard: the child's
    wait ends at the notify, not at its timeout; a child never notified waits it out."""
    import threading

    from runtime.isolated import notify_children

    def notify_when_waiting(*args):
        if args[-1] == "waiting":
            threading.Timer(0.5, notify_children).start()

    monkeypatch.setattr(
        "runtime.isolated.task_logger",
        lambda: type("L", (), {"log": lambda _, *a: notify_when_waiting(*a)})(),
    )
    cfg = _config(tmp_path)
    out = run_isolated("test_isolated:waking_target", cfg, "wake", wake=True, timeout=60.0)
    assert out["woken"] and out["waited"] < 30.0
    monkeypatch.setattr(
        "runtime.isolated.task_logger",
        lambda: type("L", (), {"log": lambda _, *a: None})(),
    )
    out = run_isolated("test_isolated:waking_target", cfg, "wake", wake=True, timeout=0.3)
    assert not out["woken"] and out["waited"] >= 0.3
