"""A real `prefect server start` (SQLite under a temporary PREFECT_HOME) for end-to-end tests."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, log: Path, what: str, timeout: float = 120.0) -> None:
    """Block until `url` answers 200 (a server `proc` started); RuntimeError with the tail of
    its `log` when it exits or does not answer within `timeout` (it is killed then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """Yields the environment (dict) that points Prefect clients at the server; its UI is at
    env["PREFECT_UI_URL"]."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI is served (tests/e2e/test_ui_recovery.py opens it in Chromium); on a port other
        # than 4200 it must be told where the API is.
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_healthy(f"http://127.0.0.1:{port}/api/health", proc, home / "server.log", "prefect server")
    try:
        yield env
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def process_group_gone(pgid: int, timeout: float = 20.0) -> bool:
    """Whether every process of group `pgid` has exited within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


REPO = Path(__file__).resolve().parents[2]
# A tiny-cpu run with the given overrides (argv), in a process of its own.
RUN_SCRIPT = """
import sys
from scalerl.config import load_config
from flows.run import scalerl_run
if __name__ == "__main__":
    scalerl_run(load_config(preset="tiny-cpu", overrides=sys.argv[1:]))
"""


def start_run(env: dict, overrides: list[str], log: Path) -> subprocess.Popen:
    """RUN_SCRIPT in its own process group (start_new_session), output to `log`, Prefect
    logging at INFO so the children's lines reach the log."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", RUN_SCRIPT, *overrides],
            env={**env, "PREFECT_LOGGING_LEVEL": "INFO"},
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_run(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    """The run's exit code; the test fails with the log's end if it does not end in time. Its
    process group is killed either way (generators, reward workers, torchrun ranks)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end in time:\n{log.read_text()[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def finished_and_verified(root: Path, run_id: str):
    """The run at `root`, asserted finished (status) and sound (verify_run: nothing lost or
    altered, nothing trained twice)."""
    from runtime.verify import verify_run
    from storage import open_store

    run = open_store(str(root)).run(run_id)
    assert run.read_status()["state"] == "finished"
    report = verify_run(run)
    assert report.ok, report.problems
    return run
