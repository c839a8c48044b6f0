"""Clean stops of `scalerl run` / `scalerl resume` on Ctrl-C and SIGTERM, within a grace period.

The first SIGINT or SIGTERM asks the run to stop (flows.run.request_stop): the flow sets the
status to stopping, the trainer checkpoints and ends, the generators end, the status becomes
"stopped" (resumable with `scalerl resume`), the temporary Prefect server stops last, and the
CLI exits 128 + the signal (130, 143). A second signal stops at once (see the deadline below).

Ctrl-C, `timeout`, `kill -- -PGID`, systemd and a Kubernetes pod stop signal the whole process
group, not the CLI alone. Only the CLI may act on it: every other process of the group is
stopped by its parent, in order, through the run's status.
- The run's child processes (runtime/isolated.py) ignore SIGINT and SIGTERM; the fork server
  they come from starts with SIGTERM blocked.
- The temporary Prefect server is started here, before the flow, in a session of its own (a
  group's signal does not reach it; it would die first and every API call of the stopping run
  would fail), with SIGINT blocked, and with a parent-death signal (Linux: PR_SET_PDEATHSIG), so
  that it still dies with the CLI when the CLI is killed.

The deadline: a stop that has not ended within the grace period (DEFAULT_GRACE_S, or
$SCALERL_STOP_GRACE_S seconds; a pod gets about 30 s before its SIGKILL), or a second signal,
kills the run's processes, marks the run "stopped" at its newest committed checkpoint
(flows.run.hard_stop: what a trainer killed mid-step had not committed is trained again on
resume) and exits 128 + the signal. A second SIGTERM within DUPLICATE_S of the first is the same
stop (`timeout` sends it to the command and then to its group).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_GRACE_S = 25.0
GRACE_ENV = "SCALERL_STOP_GRACE_S"
DUPLICATE_S = 1.0


def stop_grace_s() -> float:
    """The grace period of a stop: $SCALERL_STOP_GRACE_S seconds, else DEFAULT_GRACE_S."""
    raw = os.environ.get(GRACE_ENV, "").strip()
    if not raw:
        return DEFAULT_GRACE_S
    try:
        grace = float(raw)
    except ValueError:
        grace = float("nan")
    if not 0 < grace < float("inf"):
        raise ValueError(
            f"{GRACE_ENV}={raw!r} is not a number of seconds above 0. Fix: set it to how long a "
            f"stop may take before its processes are killed (e.g. {GRACE_ENV}=25), or unset it "
            f"for the default ({DEFAULT_GRACE_S:g} s)."
        )
    return grace


def _die_with_this_process():
    """A preexec_fn: the child gets SIGKILL when the thread that started it (the CLI's main
    thread) ends, where the platform allows (Linux); it exits at once if that already happened."""
    parent = os.getpid()
    prctl = None
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        if prctl is not None:
            prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class _OwnSession:
    """prefect.server.api.server's `subprocess` while the temporary server starts: its Popen
    starts the server in a session of its own that dies with this process."""

    def __init__(self, preexec) -> None:
        self._preexec = preexec

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    def Popen(self, *args, **kwargs):  # noqa: N802 - stands in for subprocess.Popen
        return subprocess.Popen(*args, **kwargs, start_new_session=True, preexec_fn=self._preexec)


def _start_temporary_server() -> None:
    """Start Prefect's temporary server now (it would start at the flow's first API call), in
    a session of its own that dies with this process, with SIGINT blocked; nothing when
    PREFECT_API_URL is set."""
    if os.environ.get("PREFECT_API_URL"):
        return
    import prefect.server.api.server as server_module
    from prefect.client.orchestration import get_client

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    mask = os.umask(0o077)  # the server inherits it: the files it creates are the owner's alone
    server_module.subprocess = _OwnSession(_die_with_this_process())
    try:
        with get_client(sync_client=True) as client:
            client.hello()
    finally:
        server_module.subprocess = subprocess
        os.umask(mask)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    _private_database()


def _private_database() -> None:
    """Make the temporary server's SQLite database (and its -wal / -shm files) readable by this
    user only: it holds every run's parameters, states and logs, and one created by an earlier
    run (or by Prefect before this was done) was world-readable (mode 644)."""
    from pathlib import Path

    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.server.database.connection_url
    url = url.get_secret_value() if url is not None else None
    if url and not url.startswith("sqlite"):
        return  # a database server of the user's: not ours to change
    db = (
        Path(url.split("///", 1)[1]) if url and "///" in url else Path(settings.home) / "prefect.db"
    )
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        with contextlib.suppress(OSError):  # absent, or another user's: leave it
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)


def _deadline(signum: int, grace_s: float, now: threading.Event) -> None:
    """From the first signal on (a daemon thread): when the process is still alive `grace_s`
    seconds later, or at once when `now` is set (a second signal), kill the run's processes,
    mark the run stopped at its newest checkpoint and exit 128 + signum."""
    from flows.run import hard_stop

    now.wait(grace_s)
    name = signal.Signals(signum).name
    why = "a second signal" if now.is_set() else f"the clean stop took over {grace_s:g} s"
    status = None
    try:
        status = hard_stop(f"stopped by {name} ({why}: its processes were killed)")
    except BaseException as exc:  # noqa: BLE001 - exit all the same: the pod's SIGKILL is near
        print(f"error: could not mark the run stopped ({exc})", file=sys.stderr, flush=True)
    finally:
        if status is not None:
            run_id = status.get("run_id", "")
            print(
                f"{name}: {why}; run {run_id} stopped at its newest checkpoint (step "
                f"{status.get('step')}); continue it with `scalerl resume {run_id}`",
                flush=True,
            )
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(128 + signum)


@contextlib.contextmanager
def graceful_stop(grace_s: float | None = None):
    """While the body runs a flow in this (main) thread: the first SIGINT/SIGTERM requests a
    clean stop with a deadline `grace_s` seconds later (default: stop_grace_s()), a second one
    stops at once."""
    import flows.run
    from flows.run import clear_stop, request_stop

    grace = stop_grace_s() if grace_s is None else grace_s
    _start_temporary_server()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    asked: list[int] = []
    first_at: list[float] = []
    now = threading.Event()

    def handler(signum, frame):
        if asked:  # the second signal: stop now (a repeated SIGTERM at once is the same stop)
            repeat = signum == asked[0] == signal.SIGTERM
            if not (repeat and time.monotonic() - first_at[0] < DUPLICATE_S):
                now.set()
            return
        asked.append(signum)
        first_at.append(time.monotonic())
        name = signal.Signals(signum).name
        print(
            f"\n{name}: stopping the run cleanly (the trainer checkpoints first, at most "
            f"{grace:g} s); send it again to stop at once",
            flush=True,
        )
        request_stop(f"stopped by {name}")
        threading.Thread(
            target=_deadline, args=(signum, grace, now), name="scalerl-stop-deadline", daemon=True
        ).start()

    clear_stop()
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    flows.run.stop_signal_handler = handler  # Prefect's engine installs its own SIGTERM handler
    try:
        yield asked
    finally:
        flows.run.stop_signal_handler = None
        clear_stop()
        for sig, old in previous.items():
            signal.signal(sig, old)
