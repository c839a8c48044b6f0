"""Retention: what of a run's weight versions and checkpoints the store keeps (config `weights`).

    plan = prune_plan(run, config)               # what may go now, and why the rest stays
    freed = apply_plan(run, plan, by="trainer")  # delete it, record it in metrics "pruned"

Weights: a version is kept when any of these holds, else deleted:
- it is the newest committed one or version 0 (the base a trainer without a checkpoint
  starts from);
- while the run goes: it is within the staleness window, v >= latest - k - 1 (no generator
  may still load an older one: its samples would be dropped as stale anyway);
- a live reader holds it or an older one (runtime/transports/readers.py ReaderLease: a
  generator that loaded it, an evaluation reading it);
- it is an evaluation version (a multiple of evaluation.every_steps) and weights.keep_evaluated,
  or its evaluation's metrics row is not written yet.
Checkpoints: the newest weights.keep_checkpoints, and every multiple of
weights.keep_checkpoint_every. The newest of each is never deleted, so a version or
checkpoint goes only after a newer one is committed.

Deleting removes the manifest first (readers stop trusting the entry), then the files; each
deletion appends a row to the metrics stream `pruned` (kind, number, bytes, by, time), which
verify reads to tell a pruned version from a lost one. A prune killed between the two leaves a
manifest-less folder (no reader trusts it): the next deletion of a committed version above it
removes it, with every other manifest-less folder below that version (storage/dirs.py
remove_unpublished). While a run goes, the trainer's background publisher prunes after each
publish and the trainer after each checkpoint (Pruner, best effort); `scalerl runs prune RUN` applies the finished-run rules (no staleness window; live
reader leases still count) to a run that no writer holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from runtime.transports.readers import held_versions
from scalerl.config import RunConfig
from storage import Run

log = logging.getLogger(__name__)

PRUNED = "pruned"  # metrics stream: one row per deleted weight version or checkpoint


@dataclass
class PrunePlan:
    weights: list[int] = field(default_factory=list)  # versions to delete
    checkpoints: list[int] = field(default_factory=list)
    bytes: int = 0  # what their manifests list
    kept_weights: int = 0
    kept_checkpoints: int = 0
    held: dict[str, int] = field(default_factory=dict)  # live readers -> version

    def render(self) -> str:
        lines = [
            f"weights: delete {len(self.weights)} version(s), keep {self.kept_weights}"
            + (f" (e.g. v{self.weights[0]}..v{self.weights[-1]})" if self.weights else ""),
            f"checkpoints: delete {len(self.checkpoints)}, keep {self.kept_checkpoints}"
            + (f" (steps {self.checkpoints[:8]})" if self.checkpoints else ""),
        ]
        if self.held:
            lines.append(f"held by readers: {self.held}")
        lines.append(f"bytes freed: {self.bytes:,} ({self.bytes / 2**30:.2f} GiB)")
        return "\n".join(lines)


def _evaluated(run: Run) -> set[int]:
    """Versions whose evaluation is recorded (metrics eval). Not the eval shards: the shard is
    committed before its metrics row, and a version pruned in between could never be
    evaluated again (the flow evaluates only versions it finds in the store)."""
    table = run.read_metrics("eval")
    if table.num_rows == 0 or "version" not in table.column_names:
        return set()
    return {int(v) for v in table.column("version").to_pylist() if v is not None}


def keep_weights(
    versions: list[int],
    *,
    k: int,
    eval_every: int,
    keep_evaluated: bool,
    evaluated: set[int],
    held: list[int],
    running: bool,
) -> set[int]:
    """The versions (of `versions`, ascending) the rules in the module docstring keep."""
    if not versions:
        return set()
    latest = versions[-1]
    floor = min(held) if held else None
    kept = set()
    for v in versions:
        if (
            v in (0, latest)
            or (running and v >= latest - k - 1)
            or (floor is not None and v >= floor)
            or (v % eval_every == 0 and (keep_evaluated or v not in evaluated))
        ):
            kept.add(v)
    return kept


def keep_checkpoints(steps: list[int], *, last: int, every: int | None) -> set[int]:
    kept = set(steps[-last:])
    if every:
        kept |= {s for s in steps if s % every == 0}
    return kept


def prune_plan(
    run: Run, config: RunConfig, *, running: bool = True, sizes: bool = True
) -> PrunePlan:
    w = config.weights
    held = held_versions(run)
    versions = run.list_weight_versions()
    kept = keep_weights(
        versions,
        k=config.pipeline.max_off_policy_steps,
        eval_every=config.evaluation.every_steps,
        keep_evaluated=w.keep_evaluated,
        evaluated=_evaluated(run) if not w.keep_evaluated else set(),
        held=list(held.values()),
        running=running,
    )
    steps = run.list_checkpoints()
    kept_ckpts = keep_checkpoints(steps, last=w.keep_checkpoints, every=w.keep_checkpoint_every)
    plan = PrunePlan(
        weights=[v for v in versions if v not in kept],
        checkpoints=[s for s in steps if s not in kept_ckpts],
        kept_weights=len(kept),
        kept_checkpoints=len(kept_ckpts),
        held=held,
    )
    if sizes:
        plan.bytes = sum(run.weights_bytes(plan.weights).values()) + sum(
            run.checkpoint_bytes(plan.checkpoints).values()
        )
    return plan


def apply_plan(run: Run, plan: PrunePlan, *, by: str) -> int:
    """Delete what `plan` lists (weights first, oldest first). The deletions are recorded
    (metrics `pruned`) before anything is deleted: a process killed in between leaves a
    version recorded and still there (deleted by the next prune), never one gone unrecorded."""
    weights, checkpoints = plan.weights, plan.checkpoints
    if weights:  # a reader may have started on one since the plan; never what LATEST names
        held = held_versions(run)
        floor, pointed = min(held.values()) if held else None, run.weights_pointer()
        weights = [v for v in weights if (floor is None or v < floor) and v != pointed]
    if checkpoints:  # a crash can leave checkpoints/LATEST behind the newest committed one
        pointed = run.checkpoint_pointer()
        checkpoints = [c for c in checkpoints if c != pointed]
    if not weights and not checkpoints:
        return 0
    sizes = {("weights", v): n for v, n in run.weights_bytes(weights).items()}
    sizes |= {("checkpoint", s): n for s, n in run.checkpoint_bytes(checkpoints).items()}
    now = time.time()
    rows = [
        {"kind": kind, "number": n, "bytes": size, "by": by, "pruned_at": now}
        for (kind, n), size in sizes.items()
    ]
    if rows:
        run.append_metrics(PRUNED, rows)
    freed = 0
    for v in weights:
        freed += run.delete_weights(v)
    for s in checkpoints:
        freed += run.delete_checkpoint(s)
    return freed


def pruned_numbers(run: Run, kind: str) -> set[int]:
    """Weight versions (kind 'weights') or checkpoint steps ('checkpoint') retention deleted."""
    table = run.read_metrics(PRUNED)
    if table.num_rows == 0 or "kind" not in table.column_names:
        return set()
    return {
        int(n)
        for k, n in zip(
            table.column("kind").to_pylist(), table.column("number").to_pylist(), strict=True
        )
        if k == kind
    }


class Pruner:
    """Retention while the run goes: after each publish (on the trainer's background publisher
    thread, off its step) the store and, with transport local, the node-local directory."""

    def __init__(self, run: Run, config: RunConfig, local=None) -> None:
        self.run, self.config, self.local = run, config, local
        self.freed = 0

    def after_publish(self, version: int) -> None:
        self.prune()

    def prune(self) -> None:
        """Best effort: a failure is logged and retried at the next publish; the version just
        published is committed either way, so it never fails the trainer."""
        from scalerl.faults import kill_point

        try:
            plan = prune_plan(self.run, self.config, running=True, sizes=False)
            if plan.weights or plan.checkpoints:
                kill_point("pruner.before_delete")
                self.freed += apply_plan(self.run, plan, by="trainer")
            if self.local is not None:
                self._prune_local()
        except Exception as e:  # noqa: BLE001 - retention must not stop training
            log.warning("retention skipped this time (%s: %s); it tries again", type(e).__name__, e)

    def _prune_local(self) -> None:
        """The node-local directory keeps the newest version, the one before it (a generator
        may be reloading it right now) and every version at or above the oldest a live reader
        holds: it is memory under /dev/shm, and the store has the durable ones."""
        versions = self.local.list()
        if not versions:
            return
        held = list(held_versions(self.run).values())
        floor = min(held) if held else None
        latest = self.local.latest() or versions[-1]
        for v in versions:
            if v < latest - 1 and (floor is None or v < floor):
                self.freed += self.local.remove(v)
