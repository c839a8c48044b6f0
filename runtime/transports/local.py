"""weights.transport = local: one node. The trainer saves version N once, into
`{local_dir}/{run_id}/.tmp-v{N}-*`, renames it to `v{N}` (atomic on one filesystem) and then
rewrites the `LATEST` pointer file (atomic replace): engines reload straight from that
directory; nothing is copied or hashed. Generators watch the pointer (one small local read per
poll, no store request). The store still receives version 0, every `weights.durable_every`-th
version, every evaluation version (a multiple of evaluation.every_steps) and the version of
every checkpoint (make_durable), so recovery, evaluation and verify work from the store alone.
The directory (memory under /dev/shm by default) is removed when the run ends.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

from runtime.transports.base import WeightTransport, durable_beside_store
from runtime.transports.publisher import TransportPublisher, dir_bytes
from scalerl.config import RunConfig
from scalerl.engines.base import Throttled
from storage import Run

log = logging.getLogger(__name__)

LATEST = "LATEST"
LOCAL_MARKER = "weights-local"  # {root, host}: where the trainer keeps the node-local copies
LOCAL_COPIES = 4  # room /dev/shm must have, in versions: newest, previous, a held one, staging


class LocalTransportError(RuntimeError):
    pass


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


def local_dirs(run: Run) -> LocalDirs | None:
    """A reader's view of the trainer's node-local directory: where the trainer put it (marker
    weights-local), None before its first local publish. A reader on another machine cannot use
    it: LocalTransportError naming the fix."""
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
        from scalerl.lora import version_complete  # a model, or a LoRA run's adapter

        return version_complete(self.path(n))

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
        size = dir_bytes(path) if path.is_dir() else 0
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


class LocalPublisher(TransportPublisher):
    """The trainer's publisher for transport local: each version is saved into the node-local
    directory (chosen at the first publish) and renamed into place; the store receives the
    durable ones from there."""

    def __init__(self, run: Run, transport, dtype: str | None = None) -> None:
        super().__init__(run, transport, dtype)
        self.local: LocalDirs | None = None

    def _staging(self, version: int, state: dict) -> Path:
        if self.local is None:
            self._open_local(sum(t.numel() * t.element_size() for t in state.values()))
        return self.local.staging(version)

    def _save(self, version: int, staged: Path, model, tokenizer, state: dict) -> None:
        try:
            super()._save(version, staged, model, tokenizer, state)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise LocalTransportError(
                    f"no space left in {self.local.root} for weights v{version} "
                    f"(weights.transport = local). Fix: set weights.local_dir to a local "
                    "disk with room for 4 versions, or use weights.transport=store."
                ) from e
            raise

    def _commit(self, version: int, staged: Path) -> Path:
        return self.local.commit(version, staged)

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
        self._ledger(version, True, dir_bytes(self.local.path(version)))

    def latest_version(self) -> int | None:
        stored = self.run.latest_weights_version()
        local = self.local.latest() if self.local is not None else None
        found = [v for v in (stored, local) if v is not None]
        return max(found) if found else None


class LocalWeights:
    """WeightSource over the node-local directory: the pointer file is read on each poll (no
    store request), and the engine reloads straight from v{N}/. Until the trainer's first local
    publish it asks the store where that directory is, at most every second."""

    def __init__(self, run: Run, current: int, lease=None) -> None:
        self.run, self.current, self.lease = run, current, lease
        self.dirs: LocalDirs | None = None
        self._asked = float("-inf")

    def poll(self):
        if self.dirs is None:
            if time.monotonic() - self._asked < 1.0:
                return None
            self._asked = time.monotonic()
            self.dirs = local_dirs(self.run)
            if self.dirs is None:
                return None
        latest = self.dirs.latest()
        if latest is None or latest <= self.current or not self.dirs.has(latest):
            return None
        if self.lease is not None:
            self.lease.hold(latest)
        self.current = latest
        return latest, self.dirs.path(latest)


class LocalTransport(WeightTransport):
    name = "local"

    def publisher(self, run: Run, dtype: str | None = None) -> LocalPublisher:
        return LocalPublisher(run, self, dtype)

    def source(self, run: Run, cache, current: int, lease=None, engine=None, reader="gen0"):
        """The node-local pointer every 20 ms (a local file read)."""
        return Throttled(LocalWeights(run, current, lease), interval_s=0.02)

    def durable(self, version: int) -> bool:
        return durable_beside_store(self.config, version)

    def published_version(self, run: Run) -> int | None:
        """The node-local pointer's version when it is complete there, else the store's."""
        stored = run.latest_weights_version()
        dirs = local_dirs(run)
        local = dirs.latest() if dirs is not None else None
        if local is None or not dirs.has(local):
            return stored
        return local if stored is None else max(stored, local)

    def local_path(self, run: Run, version: int) -> Path | None:
        """A version still in the trainer's node-local directory is read there in place."""
        dirs = local_dirs(run)
        return dirs.path(version) if dirs is not None and dirs.has(version) else None

    def end_of_run(self, run: Run) -> None:
        """Remove the run's node-local directory: under /dev/shm it is memory. The store holds
        every version a resume or an evaluation needs (checkpoint versions are made durable)."""
        try:
            dirs = local_dirs(run)
        except LocalTransportError:
            return  # another machine's
        except Exception as e:  # noqa: BLE001 - best effort: never masks why the run ended
            log.warning("could not find the node-local weights to remove (%s)", e)
            return
        if dirs is not None:
            dirs.remove_all()
