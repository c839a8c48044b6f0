"""The one place where the run store meets the trainer: its four Protocols over a storage Run.

    run = open_store(cfg.storage.url).run(run_id)
    io = TrainerIO.over(run, stage="filtered", config=cfg)
    Trainer(cfg, run_id=run_id, source=io.source, publisher=io.publisher,
            checkpoints=io.checkpoints, metrics=io.metrics).train()

- RunShardSource: committed shards of one stage in commit order. Shards the store refuses as
  not ours (SchemaVersionError: another rollout schema version; ForeignFileError: another run's
  rows or commit record; CorruptShardError; InvalidRolloutsError) become ShardRejected: the
  trainer skips them, counts them (metrics `shards_rejected`), the source moves them to
  quarantine/ with the reason (Run.quarantine_shard), and the trainer writes the reason into its
  ledger. Never trained on; the run keeps going, because one bad file should not stop a
  multi-day run, and the count makes it visible. Unreachable storage is NOT a rejection: it
  propagates, so the task's retry policy handles it. Neither does a file that is not a commit
  record of this run inside the stage's commits/ directory: list_shards raises ForeignFileError
  (naming the file and the fix), and the trainer stops before reading anything.
- The weight transport's publisher (runtime/transports/: transport_for(config).publisher):
  save_pretrained (floating tensors cast to the generators' dtype, model.dtype), then the
  configured transport: run.publish_weights(v, dir, overwrite=True) for `store` (an identical
  re-publish is a no-op, and a trainer resuming from a checkpoint older than the newest
  published version replaces the dead process's copy: its own lineage is the one it trains
  from), a rename into the node-local directory for `local` (plus the store at durable
  versions); then retention (runtime/retention.py).
- RunCheckpointStore: run.save_checkpoint / latest_checkpoint_step / load_checkpoint; the
  store's manifest-last commit leaves the previous checkpoint usable after a crash mid-write.
  At resume a checkpoint whose files no longer match its manifest (missing, another size: one
  listing; sha256 of the downloaded copy) or that fails to load (trainer_state.json, rng.json
  unparseable, a .pt file torch.load refuses) is quarantined (Run.quarantine_checkpoint: copied
  aside with the reason, then taken out of use) and the previous intact checkpoint is used,
  with a warning naming both; the steps after it are trained again (read_metrics keeps one
  row per step). With none intact the trainer starts as a run without a checkpoint does.
- RunMetricsSink: run.append_metrics(name, rows), one part file per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from runtime.transports import transport_for
from runtime.transports.publisher import TransportPublisher
from scalerl.config import RunConfig
from scalerl.trainer import ShardRejected
from storage import Run
from storage.errors import (
    CorruptShardError,
    ForeignFileError,
    InvalidRolloutsError,
    SchemaVersionError,
)

_REJECTED = (SchemaVersionError, ForeignFileError, CorruptShardError, InvalidRolloutsError)


INTAKE_MARKER = "trainer-intake"


class RunShardSource:
    """Committed shards of one stage, in commit order. After every read it publishes how far
    into that order the trainer has got (marker `trainer-intake`: shards_read, and next_step,
    the step the next unread shard goes to, from note_step), which generators use as
    backpressure so they do not generate what the trainer could no longer use. A shard it must reject is
    also quarantined (Run.quarantine_shard, with the reason), so no other reader trips on it;
    this stage's quarantined shards count as read in the marker (their raw inputs still count
    as committed for the generators)."""

    def __init__(self, run: Run, stage: str, *, rank: int | None = None) -> None:
        """rank: the trainer rank under torchrun (None: a single process). Only rank 0 writes
        the marker; no rank quarantines a shard while reading it: the trainer has every rank
        read it first, then rank 0 calls quarantine() (scalerl/trainer/loop.py ingest)."""
        self.run, self.stage, self.rank = run, stage, rank
        self._position: dict[str, int] = {}
        self._read_upto = 0
        self._next_step: int | None = None
        self._gone: int | None = None  # quarantined keys of the stage (list_ready)

    def list_ready(self) -> list[str]:
        """Committed keys in commit order: one listing (plus the records not seen before).
        The stage's quarantined keys are listed again only when they can have changed: at the
        first call, after this source quarantined one, or when a key listed before is gone
        (a quarantine removes the commit record after writing its reason)."""
        keys = [info.key for info in self.run.list_shards(self.stage)]
        if self._gone is None or not self._position.keys() <= set(keys):
            self._gone = len(self.run.quarantined_keys(self.stage))
        self._position = {key: self._gone + i for i, key in enumerate(keys)}
        return keys

    def read(self, key: str) -> pa.Table:
        try:
            table = self.run.read_shard(self.stage, key)
        except _REJECTED as e:
            if self.rank is None:
                self.quarantine(key, e)
            raise ShardRejected(f"{type(e).__name__}: {e}") from e
        finally:
            upto = self._position.get(key, -1) + 1
            if upto > self._read_upto:
                self._read_upto = upto
                self._write_marker()
        return table

    def note_step(self, step: int) -> None:
        """The trainer took its batch: shards not yet read go to `step` or later."""
        self._next_step = step
        self._write_marker()

    def _write_marker(self) -> None:
        if self.rank not in (None, 0):
            return
        doc = {"stage": self.stage, "shards_read": self._read_upto}
        if self._next_step is not None:
            doc["next_step"] = self._next_step
        self.run.write_marker(INTAKE_MARKER, doc)

    def quarantine(self, key: str, error: Exception | str) -> None:
        import logging

        from storage.errors import StorageUnreachableError, StoreError

        self._gone = None  # list_ready counts them again
        try:
            self.run.quarantine_shard(self.stage, key, error, by="trainer")
        except StorageUnreachableError:
            raise  # not the shard's fault: the task's retry policy handles it
        except StoreError as e:  # e.g. a foreign commit record: still never trained on
            logging.getLogger(__name__).warning(
                "could not quarantine %s/%s (%s); skipping it", self.stage, key, e
            )

    def curriculum_version(self) -> int | None:
        found = self.run.load_curriculum()
        return None if found is None else found[0]


class RunCheckpointStore:
    """Checkpoints over a run. latest_step() and load() skip damaged checkpoints: each one is
    quarantined and the next older intact one is used (see the module docstring); load(step)
    may therefore return an older checkpoint than `step` (its trainer_state.json says which),
    or None when no intact one is left."""

    def __init__(self, run: Run, after_save=None) -> None:
        """after_save: called after each committed checkpoint (retention: the older ones that
        are no longer kept go now, not at the next publish)."""
        self.run, self.after_save = run, after_save

    def latest_step(self) -> int | None:
        step = self.run.latest_checkpoint_step()
        if step is None:
            return None
        damage = self.run.checkpoint_damage([step]).get(step)
        if damage is None:  # withdrawn meanwhile (republished): look again
            return self.latest_step()
        if damage:
            return self._fall_back(step, damage)
        return step

    def save(self, step: int, local_dir: Path, extra: list[dict] | None = None) -> None:
        self.run.save_checkpoint(step, local_dir, overwrite=True, extra=extra)
        if self.after_save is not None:
            self.after_save()

    def withdraw(self, step: int) -> None:
        self.run.withdraw_checkpoint(step)

    def upload_part(self, step: int, local_dir: Path) -> list[dict]:
        return self.run.upload_checkpoint_part(step, local_dir)

    def load(self, step: int, local_dir: Path) -> Path | None:
        from storage.dirs import DamagedEntryError

        try:
            local = self.run.load_checkpoint(step, local_dir, checksum=True)
            problem = _load_problem(local)
        except DamagedEntryError as e:
            problem = "; ".join(e.damage) or str(e)
        if problem is None:
            return local
        older = self._fall_back(step, [problem])
        if older is None:
            return None  # the trainer starts as a run without a checkpoint does
        return self.load(older, Path(f"{local_dir}-fallback-{older}"))

    def _fall_back(self, step: int, damage: list[str]) -> int | None:
        """Quarantine checkpoint `step` (damaged: one string per file), log which one is used
        instead, and return it (checked like latest_step), or None when none is left."""
        from storage.dirs import DamagedEntryError

        reason = DamagedEntryError(self.run.damage_message("checkpoint", step, damage), damage)
        doc = self.run.quarantine_checkpoint(step, reason, by="trainer", damage=damage)
        older = self.latest_step()
        _log().warning(
            "checkpoint step-%d of run %s is damaged (%s): quarantined to %s; resuming from %s",
            step,
            self.run.run_id,
            "; ".join(damage),
            doc.get("copy"),
            "no checkpoint (none intact is left): every step is trained again"
            if older is None
            else f"checkpoint step-{older} instead: the steps after {older} are trained again",
        )
        return older


def _log():
    import logging

    return logging.getLogger(__name__)


def _load_problem(local: Path) -> str | None:
    """Why a downloaded checkpoint cannot be resumed from (its JSON files do not parse, a .pt
    file does not torch.load), or None. The .pt files are memory-mapped, not read whole."""
    import json

    import torch

    for path in sorted(local.rglob("*")):
        rel = path.relative_to(local).as_posix()
        try:
            if path.suffix == ".pt":
                torch.load(path, weights_only=True, map_location="cpu", mmap=True)
            elif path.suffix == ".json" and path.parent == local:
                json.loads(path.read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 - any failure to load is the checkpoint's fault
            return f"{rel} does not load ({type(e).__name__}: {str(e)[:200]})"
    if not (local / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    return None


class RunMetricsSink:
    def __init__(self, run: Run, name: str = "trainer") -> None:
        self.run, self.name = run, name

    def append(self, rows: list[dict]) -> None:
        self.run.append_metrics(self.name, rows)


@dataclass(frozen=True)
class TrainerIO:
    source: RunShardSource
    publisher: TransportPublisher
    checkpoints: RunCheckpointStore
    metrics: RunMetricsSink

    @classmethod
    def over(
        cls,
        run: Run,
        *,
        stage: str = "filtered",
        weights_dtype: str | None = None,
        rank: int | None = None,
        config=None,
    ) -> TrainerIO:
        """All four trainer collaborators over one run (shards read from `stage`); rank: the
        trainer rank under torchrun (only rank 0 writes), None for a single process. config:
        the run's (weights transport and retention); None: transport store, nothing pruned."""
        config = config or RunConfig(weights={"prune": False})
        publisher = transport_for(config).publisher(run, weights_dtype)
        pruner = publisher.pruner
        return cls(
            RunShardSource(run, stage, rank=rank),
            publisher,
            RunCheckpointStore(run, None if pruner is None else pruner.prune),
            RunMetricsSink(run),
        )
