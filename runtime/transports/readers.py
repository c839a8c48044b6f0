"""Readers of weight versions: who still reads which version, so retention keeps it.

    lease = ReaderLease(run, "gen0"); lease.hold(v)  # before loading v; the pruner keeps it
    held_versions(run)                               # {"gen0": v, ...}: the live readers

A generator or an evaluation holds the version it loads (marker `weights-reader-{id}` with the
version and a heartbeat). Retention (runtime/retention.py) keeps every version at or above the
oldest version a live reader holds; a reader whose heartbeat is older than READER_TTL_S (a dead
process) no longer counts. Imported by the transports and by retention alike, and imports
neither.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from storage import Run

log = logging.getLogger(__name__)

READER_PREFIX = "weights-reader-"
READER_TTL_S = 120.0  # a reader lease without a heartbeat for this long is dead
READER_HEARTBEAT_S = 20.0


class ReaderLease:
    """A generator's or an evaluation's hold on the version it loads (module docstring)."""

    def __init__(self, run: Run, reader_id: str) -> None:
        self.run, self.name = run, f"{READER_PREFIX}{reader_id}"
        self.version: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, version: int) -> None:
        """Hold `version` (written before the version is read, so the pruner keeps it). A
        thread keeps the heartbeat going until release(), through long loads (an engine's
        start, a vLLM evaluation child) that poll nothing."""
        self.version = version
        self._write()
        if self._thread is None:
            self._thread = threading.Thread(target=self._beating, name=self.name, daemon=True)
            self._thread.start()

    def _beating(self) -> None:
        while not self._stop.wait(READER_HEARTBEAT_S):
            try:
                with self._lock:
                    if self.version is not None and not self._stop.is_set():
                        self._write()
            except Exception as e:  # noqa: BLE001 - the next beat tries again
                log.warning("reader lease %s: heartbeat failed (%s)", self.name, e)

    def _write(self) -> None:
        self.run.write_marker(
            self.name,
            {
                "version": self.version,
                "heartbeat": time.time(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            },
        )

    def release(self) -> None:
        self._stop.set()
        with self._lock:
            self.version = None
            self.run.delete_marker(self.name)


def held_versions(run: Run, now: float | None = None) -> dict[str, int]:
    """reader -> version held, for the readers whose heartbeat is younger than READER_TTL_S."""
    now = time.time() if now is None else now
    out = {}
    for name, doc in run.read_markers(READER_PREFIX).items():
        version, beat = doc.get("version"), doc.get("heartbeat")
        if (
            isinstance(version, int)
            and isinstance(beat, (int, float))
            and now - beat < READER_TTL_S
        ):
            out[name[len(READER_PREFIX) :]] = version
    return out
