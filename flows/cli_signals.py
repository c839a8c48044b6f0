"""Clean stops of `scalerl run` / `scalerl resume` on Ctrl-C and SIGTERM.

The first SIGINT or SIGTERM asks the run to stop (flows.run.request_stop): the flow sets the
status to stopping, the trainer checkpoints and ends, the generators end, the status becomes
"stopped" (resumable with `scalerl resume`), and the temporary Prefect server stops last. A
second signal stops at once, as before.

Ctrl-C signals the whole process group. The run's child processes ignore SIGINT (their parent
stops them through the run's status), and so must the temporary Prefect server, or it dies
first and every API call of the stopping run fails: it is started here, before the flow, with
SIGINT blocked, and a blocked signal mask is inherited by the server process.
"""

from __future__ import annotations

import contextlib
import os
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _start_temporary_server() -> None:
    """Start Prefect's temporary server now (it would start at the flow's first API call),
    with SIGINT blocked so that it inherits the block; nothing when PREFECT_API_URL is set."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.client.orchestration import get_client

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    mask = os.umask(0o077)  # the server inherits it: the files it creates are the owner's alone
    try:
        with get_client(sync_client=True) as client:
            client.hello()
    finally:
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


@contextlib.contextmanager
def graceful_stop():
    """While the body runs a flow in this (main) thread: the first SIGINT/SIGTERM requests a
    clean stop, a second one interrupts."""
    import flows.run
    from flows.run import request_stop

    _start_temporary_server()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    asked: list[int] = []

    def handler(signum, frame):
        if asked:  # the second signal: stop now
            for sig, old in previous.items():
                signal.signal(sig, old)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        asked.append(signum)
        name = signal.Signals(signum).name
        print(
            f"\n{name}: stopping the run cleanly (the trainer checkpoints first); "
            "send it again to stop at once",
            flush=True,
        )
        request_stop(f"stopped by {name}")

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    flows.run.stop_signal_handler = handler  # Prefect's engine installs its own SIGTERM handler
    try:
        yield asked
    finally:
        flows.run.stop_signal_handler = None
        for sig, old in previous.items():
            signal.signal(sig, old)
