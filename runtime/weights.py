"""Weight transports: how policy version v travels from the trainer to the generators and the
evaluations (config `weights`), what is durable when, and who still reads which version.

    publisher = TransportPublisher(run, config)      # the trainer's WeightPublisher
    source = weight_source(run, config, cache, v)    # a generator's WeightSource
    lease = ReaderLease(run, "gen0"); lease.hold(v)  # before loading v; the pruner keeps it

Transports (weights.transport):
- store: every version is published to the run store (weights/v{N}/, manifest-last, sha256 of
  each file, all in the trainer's background publisher thread) and every generator downloads
  it into a local cache. Durable; works across machines and clouds.
- local: one node. The trainer saves version N once, into `{local_dir}/{run_id}/.tmp-v{N}-*`,
  renames it to `v{N}` (atomic on one filesystem) and then rewrites the `LATEST` pointer file
  (atomic replace): engines reload straight from that directory; nothing is copied or hashed.
  Generators watch the pointer (one small local read per poll, no store request). The store
  still receives version 0, every `weights.durable_every`-th version, every evaluation
  version (a multiple of evaluation.every_steps) and the version of every checkpoint
  (make_durable), so recovery, evaluation and verify work from the store alone.
- nccl (GPU only): vLLM's NCCL weight-transfer engine; runtime/weights_nccl.py.

The ledger: before a version becomes visible to anyone, the trainer appends its row to the
run's `weights` metrics stream (version, transport, durable, bytes, host, time). A version a
generator used but the store never received is therefore always identifiable, and verify
tells "never stored by design" (durable false) from "lost". A crash between the row and the
publish leaves a row for a version nobody saw; the resumed trainer publishes it again.

Readers: a generator or an evaluation holds the version it loads (`ReaderLease`: marker
`weights-reader-{id}` with the version and a heartbeat). Retention (runtime/retention.py) keeps
every version at or above the oldest version a live reader holds; a reader whose heartbeat is
older than READER_TTL_S (a dead process) no longer counts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from scalerl.config import RunConfig
from scalerl.faults import kill_point
from storage import Run

log = logging.getLogger(__name__)

LEDGER = "weights"  # metrics stream: one row per published version
READER_PREFIX = "weights-reader-"
READER_TTL_S = 120.0  # a reader lease without a heartbeat for this long is dead
READER_HEARTBEAT_S = 20.0
LATEST = "LATEST"


# -- which versions are durable ----------------------------------------------------------------


def always_durable(config: RunConfig, version: int) -> bool:
    """Versions the store receives whatever the transport: version 0 (the base, which a
    trainer without a checkpoint starts from), every weights.durable_every-th, and every
    evaluation version. Checkpoint versions are made durable by the checkpoint itself."""
    w = config.weights
    return (
        w.transport == "store"
        or version == 0
        or version % w.durable_every == 0
        or version % config.evaluation.every_steps == 0
    )


# -- the node-local directory ------------------------------------------------------------------


LOCAL_MARKER = "weights-local"  # {root, host}: where the trainer keeps the node-local copies
LOCAL_COPIES = 4  # room /dev/shm must have, in versions: newest, previous, a held one, staging


def choose_local_root(config: RunConfig, run_id: str, version_bytes: int) -> Path:
    """The trainer's node-local directory: `{weights.local_dir}/{run_id}`; by default under
    /dev/shm (memory, no disk write) when it has room for LOCAL_COPIES versions (containers
    often give /dev/shm 64 MB), else under the system temp directory."""
    if config.weights.local_dir is not None:
        return Path(config.weights.local_dir) / run_id
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free >= LOCAL_COPIES * version_bytes:
        return shm / "scalerl" / run_id
    return Path(tempfile.gettempdir()) / "scalerl" / run_id


class LocalTransportError(RuntimeError):
    pass


def local_dirs(run: Run, config: RunConfig) -> LocalDirs | None:
    """A reader's view of the trainer's node-local directory (transport local): where the
    trainer put it (marker weights-local), None before its first local publish. A reader on
    another machine cannot use it: LocalTransportError naming the fix."""
    if config.weights.transport != "local":
        return None
    doc = run.read_marker(LOCAL_MARKER)
    if doc is None:
        return None
    if doc.get("host") != socket.gethostname():
        raise LocalTransportError(
            f"weights.transport = 'local': the trainer keeps the weights in {doc.get('root')} "
            f"on {doc.get('host')}, and this process runs on {socket.gethostname()}, which "
            "cannot read it. Fix: run the generators on the trainer's machine, or use "
            "weights.transport=store (or nccl on GPUs)."
        )
    return LocalDirs(Path(doc["root"]))


class LocalDirs:
    """Versions in one node-local directory: v{N}/ (complete when it has its name: it is
    renamed into place) and LATEST (the newest, replaced atomically)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, n: int) -> Path:
        return self.root / f"v{n}"

    def has(self, n: int) -> bool:
        return (self.path(n) / "config.json").is_file()

    def staging(self, n: int) -> Path:
        """A fresh directory on the same filesystem to save version n into."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-v{n}-", dir=self.root))

    def commit(self, n: int, staged: Path) -> Path:
        """Rename `staged` to v{n} (a republished version replaces the old one: the old is
        renamed aside first, then removed) and point LATEST at n if it is newer."""
        dest = self.path(n)
        if dest.exists():
            aside = self.root / f".old-v{n}-{uuid.uuid4().hex[:8]}"
            os.replace(dest, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(staged, dest)
        latest = self.latest()
        if latest is None or n >= latest or not self.has(latest):
            tmp = self.root / f".tmp-{LATEST}-{uuid.uuid4().hex[:8]}"
            tmp.write_text(json.dumps({"version": n}))
            os.replace(tmp, self.root / LATEST)
        return dest

    def latest(self) -> int | None:
        try:
            return int(json.loads((self.root / LATEST).read_text())["version"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def list(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.name.startswith("v") and p.name[1:].isdigit() and p.is_dir():
                out.append(int(p.name[1:]))
        return sorted(out)

    def remove(self, n: int) -> int:
        """Delete version n (never the one LATEST names); returns the bytes freed."""
        if n == self.latest():
            return 0
        path = self.path(n)
        size = _dir_bytes(path) if path.is_dir() else 0
        aside = self.root / f".old-v{n}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, aside)  # readers never see a half-deleted v{n}
        except FileNotFoundError:
            return 0
        shutil.rmtree(aside, ignore_errors=True)
        return size

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def sweep(self) -> None:
        """Remove what a killed writer left: staging (.tmp-*) and renamed-aside (.old-*)."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-", ".old-")):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)


# -- the trainer's side ------------------------------------------------------------------------


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class TransportPublisher:
    """The trainer's WeightPublisher (scalerl.trainer.loop) for weights.transport store and
    local (module docstring). It runs on the trainer's background publisher thread, so the
    save, the upload, the hashing and the pruning are all off the trainer's step."""

    def __init__(self, run: Run, config: RunConfig | None = None, dtype: str | None = None) -> None:
        self.run = run
        self.config = config or RunConfig()
        self.dtype_name = dtype or self.config.model.dtype
        self.transport = self.config.weights.transport
        self.local: LocalDirs | None = None  # transport local: chosen at the first publish
        self.pruner = None
        if config is not None and self.config.weights.prune:
            from runtime.retention import Pruner

            self.pruner = Pruner(run, self.config, None)
        self.timings: deque[dict] = deque(maxlen=100)  # last publishes: save / store seconds

    @property
    def dtype(self):
        """The generators' dtype, as a torch dtype (torch is imported here, not by the flow
        process, which imports this module)."""
        from scalerl.models import torch_dtype

        return torch_dtype(self.dtype_name)

    def publish(
        self,
        version: int,
        model,
        tokenizer,
        state_dict: dict | None = None,
        *,
        durable: bool | None = None,
    ) -> None:
        """durable: whether the store receives it (default: always_durable)."""
        state = state_dict if state_dict is not None else model.state_dict()
        from scalerl.models import map_tensors

        dtype = self.dtype  # cast once per tensor: a tied head stays the embedding's tensor
        state = map_tensors(state, lambda t: t.to(dtype) if t.is_floating_point() else t)
        if durable is None:
            durable = always_durable(self.config, version)
        t0 = time.perf_counter()
        if self.transport == "local" and self.local is None:
            self._open_local(sum(t.numel() * t.element_size() for t in state.values()))
        if self.local is not None:
            staged = self.local.staging(version)
            tmp = None
        else:
            tmp = tempfile.TemporaryDirectory(prefix="scalerl-weights-")
            staged = Path(tmp.name)
        try:
            try:
                model.save_pretrained(staged, state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(staged)
            except OSError as e:
                if e.errno == errno.ENOSPC and self.local is not None:
                    raise LocalTransportError(
                        f"no space left in {self.local.root} for weights v{version} "
                        f"(weights.transport = local). Fix: set weights.local_dir to a local "
                        "disk with room for 4 versions, or use weights.transport=store."
                    ) from e
                raise
            saved = time.perf_counter()
            kill_point("publisher.before_commit")  # trained and saved, visible to no one
            self._ledger(version, durable, _dir_bytes(staged))  # before anyone can see it
            path = self.local.commit(version, staged) if self.local is not None else staged
            if durable:
                self.run.publish_weights(version, path, overwrite=True)
        finally:
            if tmp is not None:
                tmp.cleanup()
            elif staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
        done = time.perf_counter()
        self.timings.append({"version": version, "save_s": saved - t0, "store_s": done - saved})
        if self.pruner is not None:
            self.pruner.after_publish(version)

    def _open_local(self, version_bytes: int) -> None:
        """Pick the node-local directory (choose_local_root), clear what a killed trainer left
        there, and tell the readers where it is (marker weights-local)."""
        root = choose_local_root(self.config, self.run.run_id, version_bytes)
        self.local = LocalDirs(root)
        self.local.sweep()
        self.run.write_marker(LOCAL_MARKER, {"root": str(root), "host": socket.gethostname()})
        if self.pruner is not None:
            self.pruner.local = self.local

    def make_durable(self, version: int) -> None:
        """The store receives `version` now (a checkpoint's version; the final one) if it has
        not yet: from the local directory, where the last versions are kept."""
        if self.local is None or self.run.has_weights(version):
            return
        if not self.local.has(version):
            log.warning(
                "weights v%d is not in %s any more: the store does not receive it (its "
                "checkpoint holds the same weights)",
                version,
                self.local.root,
            )
            return
        self.run.publish_weights(version, self.local.path(version), overwrite=True)
        self._ledger(version, True, _dir_bytes(self.local.path(version)))

    def latest_version(self) -> int | None:
        stored = self.run.latest_weights_version()
        local = self.local.latest() if self.local is not None else None
        found = [v for v in (stored, local) if v is not None]
        return max(found) if found else None

    def _ledger(self, version: int, durable: bool, size: int) -> None:
        record_version(self.run, version, self.transport, durable, size)


def record_version(run: Run, version: int, transport: str, durable: bool, size: int) -> None:
    """The publish ledger's row for `version` (module docstring)."""
    run.append_metrics(
        LEDGER,
        [
            {
                "version": version,
                "transport": transport,
                "durable": durable,
                "bytes": size,
                "host": socket.gethostname(),
                "published_at": time.time(),
            }
        ],
    )


def published_version(run: Run, config: RunConfig) -> int | None:
    """The newest version the generators can have: the store's for transport store; the
    node-local pointer's when that version is complete there (else the store's) for local."""
    stored = run.latest_weights_version()
    dirs = local_dirs(run, config)
    local = dirs.latest() if dirs is not None else None
    if local is None or not dirs.has(local):
        return stored
    return local if stored is None else max(stored, local)


# -- the readers' side -------------------------------------------------------------------------


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


class LocalWeights:
    """WeightSource over the node-local directory (transport local): the pointer file is read
    on each poll (no store request), and the engine reloads straight from v{N}/. Until the
    trainer's first local publish it asks the store where that directory is, at most every
    second."""

    def __init__(
        self, run: Run, config: RunConfig, current: int, lease: ReaderLease | None = None
    ) -> None:
        self.run, self.config, self.current, self.lease = run, config, current, lease
        self.dirs: LocalDirs | None = None
        self._asked = float("-inf")

    def poll(self):
        if self.dirs is None:
            if time.monotonic() - self._asked < 1.0:
                return None
            self._asked = time.monotonic()
            self.dirs = local_dirs(self.run, self.config)
            if self.dirs is None:
                return None
        latest = self.dirs.latest()
        if latest is None or latest <= self.current or not self.dirs.has(latest):
            return None
        if self.lease is not None:
            self.lease.hold(latest)
        self.current = latest
        return latest, self.dirs.path(latest)


def drop_local_weights(config: RunConfig, run_id: str) -> None:
    """Remove the run's node-local directory (transport local) when the run ends (finished,
    stopped, stalled, failed): under /dev/shm it is memory. The store holds every version a
    resume or an evaluation needs (checkpoint versions are made durable)."""
    if config.weights.transport != "local":
        return
    from runtime.common import open_run

    try:
        dirs = local_dirs(open_run(config, run_id), config)
    except LocalTransportError:
        return  # another machine's
    except Exception as e:  # noqa: BLE001 - best effort: never masks why the run ended
        log.warning("could not find the node-local weights to remove (%s)", e)
        return
    if dirs is not None:
        dirs.remove_all()
