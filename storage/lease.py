"""One writer per run: a lease in the run store, with conditional writes only (no lock service),
so it holds on S3 as on local disk.

    lease = acquire(loc, root, run_id, holder={"flow_run_id": ...})   # or LeaseHeldError
    lease.heartbeat()        # every HEARTBEAT_S from the writer; raises LeaseLostError if taken
    lease.check()            # before a commit, in any process of the writer (cheap, cached 1 s)
    lease.release()          # at the end: the next writer need not wait for the expiry

Layout: `{run}/lease/{generation:012d}.json`, one file per holder, created exclusively (a hard
link locally, `If-None-Match: *` on S3), so of two writers that try to take generation n + 1
exactly one succeeds. The newest generation is the lease. Its holder rewrites its own file to
heartbeat (host, pid, flow run, heartbeat time, expiry); it has lost the lease exactly when the
file of generation n + 1 exists, which a single exists() tells (no listing on the commit path).

A newcomer takes the lease over when the newest holder released it, when it expired (no
heartbeat for TTL_S seconds; clocks of the machines are assumed to agree within a few seconds),
when it runs on this host and its process is gone, or when it was an earlier attempt of the same
Prefect flow run (a Retry runs only after the attempt before it ended).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from storage import fsio
from storage.errors import StoreError

TTL_S = 60.0  # a lease without a heartbeat for this long may be taken over
HEARTBEAT_S = 10.0
CHECK_EVERY_S = 1.0  # check(): one exists() per second at most per process
ENV = (
    "SCALERL_LEASE"  # {"run": id, "generation": n, "owner": ...}: the writer's children inherit it
)


class LeaseHeldError(StoreError, ValueError):
    """Another live writer holds the run. A ValueError: retrying at once cannot help."""


class LeaseLostError(StoreError):
    """This writer's lease was taken over (it stopped heartbeating past its expiry)."""


def _name(generation: int) -> str:
    return f"{generation:012d}.json"


def pid_alive(pid: int) -> bool:
    """True while process `pid` runs on this host; a zombie (killed, not reaped yet) is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state is the field after the parenthesised command name
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


@dataclass
class Lease:
    """The lease `generation` of run `run_id`, held by `owner` (this process or its parent)."""

    loc: object
    root: str
    run_id: str
    generation: int
    owner: str
    doc: dict = field(default_factory=dict)
    _checked_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def _dir(self) -> str:
        return f"{self.root}/lease"

    def _path(self, generation: int) -> str:
        return f"{self._dir}/{_name(generation)}"

    def env(self) -> str:
        return json.dumps({"run": self.run_id, "generation": self.generation, "owner": self.owner})

    def check(self, *, force: bool = False) -> None:
        """Raise LeaseLostError if a newer generation exists (someone took the run over)."""
        now = time.monotonic()
        if not force and now - self._checked_at < CHECK_EVERY_S:
            return
        if self.loc.fs.exists(self._path(self.generation + 1)):
            newer = _read(self.loc, self._path(self.generation + 1)) or {}
            raise LeaseLostError(
                f"run {self.run_id} was taken over by {_who(newer)} after this writer's lease "
                f"(generation {self.generation}) expired: it stops without writing more. Fix: "
                "nothing to do here; the run goes on under its new writer (`scalerl runs ls`)."
            )
        self._checked_at = now

    def heartbeat(self) -> None:
        """Check, then push the expiry forward (rewrite our own generation's file)."""
        with self._lock:
            self.check(force=True)
            now = time.time()
            self.doc = {**self.doc, "heartbeat_at": now, "expires_at": now + TTL_S}
            fsio.write_atomic(self.loc, self._path(self.generation), _bytes(self.doc))

    def release(self) -> None:
        """Mark the lease free (expired now) unless it was already taken over."""
        with self._lock:
            try:
                self.check(force=True)
            except LeaseLostError:
                return
            now = time.time()
            self.doc = {**self.doc, "heartbeat_at": now, "expires_at": now, "released": True}
            fsio.write_atomic(self.loc, self._path(self.generation), _bytes(self.doc))


def _bytes(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def _read(loc, path: str) -> dict | None:
    try:
        return json.loads(fsio.read_bytes(loc, path))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # being rewritten on a store without atomic replace: treat as unknown


def _who(doc: dict) -> str:
    where = f"pid {doc.get('pid')} on {doc.get('host')}"
    if doc.get("flow_run_id"):
        where += f" (Prefect flow run {doc['flow_run_id']})"
    return where


def newest(loc, root: str) -> tuple[int, dict] | None:
    """(generation, document) of the newest lease of the run at `root`, or None."""
    names = sorted(
        fsio.basename(i)
        for i in fsio.ls(loc, f"{root}/lease")
        if fsio.basename(i).endswith(".json") and fsio.basename(i)[:-5].isdigit()
    )
    if not names:
        return None
    generation = int(names[-1][:-5])
    return generation, _read(loc, f"{root}/lease/{names[-1]}") or {}


def free_reason(doc: dict, *, flow_run_id: str | None, now: float | None = None) -> str | None:
    """Why the lease described by `doc` may be taken over now, or None while it is held."""
    now = time.time() if now is None else now
    if doc.get("released"):
        return "released"
    if not doc or now >= float(doc.get("expires_at", 0)):
        return "expired"
    if doc.get("host") == socket.gethostname() and not pid_alive(int(doc.get("pid", 0))):
        return "its process is gone"
    if flow_run_id and doc.get("flow_run_id") == flow_run_id:
        return "an earlier attempt of this flow run"
    return None


def acquire(loc, root: str, run_id: str, holder: dict | None = None) -> Lease:
    """Take the run's lease, or raise LeaseHeldError naming the live holder."""
    holder = holder or {}
    for _ in range(5):  # lost races: someone else created the generation we wanted
        found = newest(loc, root)
        generation = 1 if found is None else found[0] + 1
        if found is not None:
            reason = free_reason(found[1], flow_run_id=holder.get("flow_run_id"))
            if reason is None:
                doc = found[1]
                raise LeaseHeldError(
                    f"run {run_id} is being written by {_who(doc)}, heartbeat "
                    f"{time.time() - float(doc.get('heartbeat_at', 0)):.0f} s ago: two writers "
                    "would train every step twice. Fix: wait for that run to end (or stop it); "
                    f"a writer that stopped heartbeating is taken over {TTL_S:.0f} s after its "
                    "last heartbeat."
                )
        now = time.time()
        doc = {
            **holder,
            "owner": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "generation": generation,
            "acquired_at": now,
            "heartbeat_at": now,
            "expires_at": now + TTL_S,
            "took_over": None if found is None else found[0],
        }
        lease = Lease(loc, root, run_id, generation, doc["owner"], doc)
        if fsio.create_exclusive(loc, lease._path(generation), _bytes(doc)):
            return lease
    raise LeaseHeldError(
        f"run {run_id}: could not take its lease after 5 tries (other writers keep taking it). "
        "Fix: start the run once."
    )


def inherited(loc, root: str, run_id: str) -> Lease | None:
    """The lease this process writes under, passed down by its writer in $SCALERL_LEASE, when it
    is for `run_id`; None otherwise (a reader, or a tool outside a run)."""
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except ValueError:
        return None
    if spec.get("run") != run_id:
        return None
    return Lease(loc, root, run_id, int(spec["generation"]), spec["owner"])
