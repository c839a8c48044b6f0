"""The run flow's hold on its run: one writer per run (storage/lease.py), kept alive by a
heartbeat thread, passed to the generator, trainer and evaluation processes through
$SCALERL_LEASE so that every commit of theirs checks it too.

    writer = hold_run(run, flow_run_id)   # LeaseHeldError (one line naming the holder) if taken
    writer.check()                        # in the flow loop: LeaseLostError once taken over,
                                          # RunDeletedError once the run's directory is gone
    writer.release()                      # at the end, whatever happened

The heartbeat (every leases.heartbeat_s()) is where a deleted run is noticed: the lease file is
gone with it, and nothing is written (storage/lease.py).
"""

from __future__ import annotations

import logging
import os
import threading

from storage import lease as leases
from storage.errors import RunDeletedError

log = logging.getLogger("scalerl.writer")


class RunWriter:
    def __init__(self, run, holder: dict) -> None:
        self.lease = run.acquire_lease(holder)
        self._previous_env = os.environ.get(leases.ENV)
        os.environ[leases.ENV] = self.lease.env()  # children submitted from now on inherit it
        self.lost = threading.Event()
        self.error: Exception | None = None  # why the heartbeat stopped (lost, or deleted)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="scalerl-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(leases.heartbeat_s()):
            try:
                self.lease.heartbeat()
            except (leases.LeaseLostError, RunDeletedError) as exc:
                log.error("%s", exc)
                self.error = exc
                self.lost.set()
                return
            except Exception as exc:  # noqa: BLE001 - e.g. an outage: the next beat retries
                log.warning("lease heartbeat of run %s failed: %s", self.lease.run_id, exc)

    def check(self) -> None:
        """Raise LeaseLostError if the heartbeat found the run taken over, RunDeletedError if it
        found the run deleted."""
        if self.lost.is_set():
            self.lease.check(force=True)
            if self.error is not None:
                raise self.error

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if os.environ.get(leases.ENV) == self.lease.env():
            if self._previous_env is None:
                os.environ.pop(leases.ENV, None)
            else:
                os.environ[leases.ENV] = self._previous_env
        try:
            self.lease.release()
        except Exception as exc:  # noqa: BLE001 - it then expires by itself
            log.warning("could not release the lease of run %s: %s", self.lease.run_id, exc)


def hold_run(run, flow_run_id: str | None = None) -> RunWriter:
    """Become `run`'s one writer for this flow run (see storage/lease.py for the rules)."""
    return RunWriter(run, {"flow_run_id": flow_run_id})
