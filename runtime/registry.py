"""The generator registry: a generator's entry in its run (marker generator-{id}) with a heartbeat
thread, wherever it runs, and the live entries the backpressure gate and the generator pool
count."""

from __future__ import annotations

import logging
import threading
import time

GENERATOR_PREFIX = "generator-"


GENERATOR_HEARTBEAT_S = 5.0


# A generator without a heartbeat for this long is no longer counted by the gate. Counting a
# dead one a while longer only makes the gate stricter (it never lets a batch past k); not
# counting a live one would. A generator downloading a multi-GB version may be silent for
# tens of seconds, hence generous.
GENERATOR_TTL_S = 120.0


class GeneratorRegistration:
    """A generator's entry in its run (marker generator-{id}: id, host, pid, flow run, started,
    heartbeat), wherever it runs: the backpressure gate counts the live entries instead of
    config.generation.num_generators, so generators added from other machines (the
    scalerl-generate deployment) are counted and lost ones stop being counted."""

    def __init__(self, run, generator_id: str, flow_run_id: str | None = None) -> None:
        """flow_run_id: the Prefect flow run the generator belongs to (shown, not used)."""
        import os
        import socket

        self.run, self.name = run, f"{GENERATOR_PREFIX}{generator_id}"
        self.doc = {
            "id": generator_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "flow_run_id": flow_run_id,
            "started": time.time(),
        }
        self._beat = float("-inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.heartbeat()
        self.doc["started"] = time.time()  # counted from when the entry is there
        # a thread keeps the heartbeat through long engine steps, loads and batches (a gate
        # that stopped counting a generator with a batch in flight would let one past k)
        self._thread = threading.Thread(target=self._beating, name=self.name, daemon=True)
        self._thread.start()

    def _beating(self) -> None:
        while not self._stop.wait(GENERATOR_HEARTBEAT_S):
            try:
                self.heartbeat(force=True)
            except Exception as e:  # noqa: BLE001 - the next beat tries again
                logging.getLogger(__name__).warning("generator heartbeat failed (%s)", e)

    def heartbeat(self, force: bool = False) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            if force or time.monotonic() - self._beat >= GENERATOR_HEARTBEAT_S:
                self.run.write_marker(self.name, {**self.doc, "heartbeat": time.time()})
                self._beat = time.monotonic()

    def release(self) -> None:
        """Not counted from now on (a clean end)."""
        self._stop.set()
        with self._lock:
            self.run.delete_marker(self.name)


def live_generators(run, now: float | None = None) -> dict[str, dict]:
    """generator id -> its registration, for those with a heartbeat younger than
    GENERATOR_TTL_S."""
    now = time.time() if now is None else now
    out = {}
    for name, doc in run.read_markers(GENERATOR_PREFIX).items():
        beat = doc.get("heartbeat")
        if isinstance(beat, (int, float)) and now - beat < GENERATOR_TTL_S:
            out[name[len(GENERATOR_PREFIX) :]] = doc
    return out
