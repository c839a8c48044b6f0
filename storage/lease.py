"""One writer per run: a lease in the run store, with conditional writes only (no lock service),
so it holds on S3 as on local disk.

    lease = acquire(loc, root, run_id, holder={"flow_run_id": ...})   # or LeaseHeldError
    lease.heartbeat()        # every heartbeat_s() from the writer; LeaseLostError if taken
    lease.check()            # before a commit, in any process of the writer (cheap, cached 1 s)
    lease.release()          # at the end: the next writer need not wait for the expiry

Layout: `{run}/lease/{generation:012d}.json`, one file per holder, created exclusively (a hard
link locally, `If-None-Match: *` on S3), so of two writers that try to take generation n + 1
exactly one succeeds. The newest generation is the lease. Its holder rewrites its own file to
heartbeat (host, pid, flow run, and its own clock's heartbeat time, for people to read); it has
lost the lease exactly when the file of generation n + 1 exists, which one listing of lease/
tells (a few files: one per generation), together with whether its own file is still there.

A newcomer takes the lease over when the newest holder released it, when it expired, when it
runs on this host and its process is gone, or when it was an earlier attempt of the same Prefect
flow run (a Retry runs only after the attempt before it ended). Expiry is judged on ONE clock,
the store's: the holder's file is older than ttl_s() (SCALERL_LEASE_TTL_S, default TTL_S) when
the modification time the store gives a probe object the newcomer writes now is that much later
than the one it gave the holder's last heartbeat (mtime on disk, LastModified on S3). The clocks
of the machines never meet, so a newcomer whose clock runs ahead cannot take a live run over, and
one whose clock lags waits no longer than the TTL.

A run deleted while it runs (`rm -rf RUN`): its holder's lease file is gone. check() and
heartbeat() then raise RunDeletedError (the run marker is gone too; LeaseLostError when only the
lease file went) and write nothing, so the writer and its children stop and the run is not
re-created. check() looks on every call on local disk and at most once a second on object
stores.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from storage import fsio
from storage.errors import RunDeletedError, StoreError

TTL_S = 60.0  # a lease without a heartbeat for this long may be taken over
TTL_ENV = "SCALERL_LEASE_TTL_S"  # overrides TTL_S (seconds), e.g. for tests
HEARTBEAT_S = 10.0  # at most; ttl_s() / 6 when that is shorter
CHECK_EVERY_S = 1.0  # check() on S3: one listing of lease/ per second at most per process
PROBE_PREFIX = ".probe-"  # the newcomer's probe object in lease/, deleted at once
RUN_MARKER = ".scalerl-run.json"  # storage.store.RUN_MARKER (which imports this module)
ENV = (
    "SCALERL_LEASE"  # {"run": id, "generation": n, "owner": ...}: the writer's children inherit it
)


class LeaseHeldError(StoreError, ValueError):
    """Another live writer holds the run. A ValueError: retrying at once cannot help."""


class LeaseLostError(StoreError):
    """This writer's lease was taken over (it stopped heartbeating past its expiry)."""


def ttl_s() -> float:
    """Seconds without a heartbeat after which a lease may be taken over: $SCALERL_LEASE_TTL_S
    when it is a positive number, else TTL_S."""
    try:
        value = float(os.environ.get(TTL_ENV) or TTL_S)
    except ValueError:
        return TTL_S
    return value if value > 0 else TTL_S


def heartbeat_s() -> float:
    """How often the holder heartbeats: six beats per TTL, at most every HEARTBEAT_S."""
    return min(HEARTBEAT_S, ttl_s() / 6)


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
        """Raise LeaseLostError if a newer generation exists (someone took the run over), and
        RunDeletedError if the run was deleted (this lease's file is gone with it). One listing
        of lease/ tells both (one request on S3, at most once a second; every call on disk)."""
        now = time.monotonic()
        if not force and now - self._checked_at < CHECK_EVERY_S and not self.loc.is_local:
            return
        names = {fsio.basename(i) for i in fsio.ls(self.loc, self._dir)}
        if _name(self.generation + 1) in names:
            newer = _read(self.loc, self._path(self.generation + 1)) or {}
            raise LeaseLostError(
                f"run {self.run_id} was taken over by {_who(newer)} after this writer's lease "
                f"(generation {self.generation}) expired: it stops without writing more. Fix: "
                "nothing to do here; the run goes on under its new writer (`scalerl runs ls`)."
            )
        if _name(self.generation) not in names:
            self._gone()
        self._checked_at = now

    def _gone(self) -> None:
        """This lease's file is gone: the run was deleted, or its lease files were."""
        if not self.loc.fs.exists(f"{self.root}/{RUN_MARKER}"):
            raise fsio.run_deleted(self.loc, self.root)
        raise LeaseLostError(
            f"run {self.run_id}: this writer's lease file {self._path(self.generation)} was "
            "deleted by something else than this writer: it stops without writing more. Fix: "
            f"leave lease/ alone; `scalerl resume {self.run_id}` continues the run."
        )

    def heartbeat(self) -> None:
        """Check, then record a heartbeat (rewrite our own generation's file: the store's
        modification time of it is what a newcomer judges the expiry by)."""
        with self._lock:
            self.check(force=True)
            now = time.time()
            self.doc = {**self.doc, "heartbeat_at": now}
            fsio.write_atomic(
                self.loc, self._path(self.generation), _bytes(self.doc), within=self.root
            )

    def release(self) -> None:
        """Mark the lease free (expired now) unless it was already taken over."""
        with self._lock:
            try:
                self.check(force=True)
            except (LeaseLostError, RunDeletedError):
                return
            self.doc = {**self.doc, "heartbeat_at": time.time(), "released": True}
            fsio.write_atomic(
                self.loc, self._path(self.generation), _bytes(self.doc), within=self.root
            )


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


def store_age(loc, path: str) -> float | None:
    """Seconds since `path` was last written, on the store's clock alone: the modification time
    the store gives a probe object written now, beside it, minus the one it gave `path` (mtime
    on disk, LastModified on S3: whole seconds there). None when the store keeps no times or
    `path` is gone."""
    try:
        then = fsio.mtime(loc.fs.info(path))
    except FileNotFoundError:
        return None
    head = path.rsplit("/", 1)[0]
    probe = f"{head}/{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    fsio.write_atomic(loc, probe, b"", within=head.rsplit("/", 1)[0])
    try:
        now = fsio.mtime(loc.fs.info(probe))
    finally:
        with contextlib.suppress(FileNotFoundError):
            loc.fs.rm_file(probe)
    if not now or not then:
        return None
    return max(0.0, now - then)


def free_reason(doc: dict, *, flow_run_id: str | None, age=None) -> str | None:
    """Why the lease described by `doc` may be taken over now, or None while it is held.
    `age`: seconds since its holder's last heartbeat on the store's clock (store_age), or a
    function that tells it, asked only when no other reason frees the lease."""
    if doc.get("released"):
        return "released"
    if not doc:
        return "expired"  # unreadable
    if doc.get("host") == socket.gethostname() and not pid_alive(int(doc.get("pid", 0))):
        return "its process is gone"
    if flow_run_id and doc.get("flow_run_id") == flow_run_id:
        return "an earlier attempt of this flow run"
    age = age() if callable(age) else age
    if age is not None and age >= ttl_s():
        return "expired"
    return None


def acquire(loc, root: str, run_id: str, holder: dict | None = None) -> Lease:
    """Take the run's lease, or raise LeaseHeldError naming the live holder."""
    holder = holder or {}
    for _ in range(5):  # lost races: someone else created the generation we wanted
        found = newest(loc, root)
        generation = 1 if found is None else found[0] + 1
        if found is not None:
            doc, ages = found[1], []

            def age(path=f"{root}/lease/{_name(found[0])}", doc=doc, ages=ages) -> float:
                seen = store_age(loc, path)
                if seen is None:  # a store without modification times: the holder's own clock
                    seen = time.time() - float(doc.get("heartbeat_at", 0))
                ages.append(seen)
                return seen

            reason = free_reason(doc, flow_run_id=holder.get("flow_run_id"), age=age)
            if reason is None:
                raise LeaseHeldError(
                    f"run {run_id} is being written by {_who(doc)}, heartbeat "
                    f"{ages[-1]:.0f} s ago: two writers would train every step twice. Fix: "
                    "wait for that run to end (or stop it); a writer that stopped heartbeating "
                    f"is taken over {ttl_s():.0f} s after its last heartbeat."
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
            "took_over": None if found is None else found[0],
        }
        lease = Lease(loc, root, run_id, generation, doc["owner"], doc)
        if fsio.create_exclusive(loc, lease._path(generation), _bytes(doc), within=root):
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
