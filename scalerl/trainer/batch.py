"""Batch assembly for PipelineRL-k: ready shards in commit order -> P whole groups, never too stale.

    assembler = BatchAssembler(run_id, prompts_per_batch=P, samples_per_prompt=G,
                               max_off_policy_steps=k)
    assembler.add(key, table)            # each ready shard once, in commit order
    batch = assembler.take(v)            # None until P usable groups are buffered

Rules (../shared/SCALERL.md sec. 2, DESIGN.md "Staleness contract"), with v the trainer's policy
version (= optimizer steps done; step v trains policy v and publishes v + 1) and k =
pipeline.max_off_policy_steps:

- Staleness: a completion whose oldest token came from policy min_version may be trained at
  step v only if v - min_version <= k. A group (the G completions of one prompt) with a stale
  member is dropped WHOLE (a partial group would shift its prompt's baseline mean(r)); its
  completions are counted in `dropped_stale`. v only grows, so stale never becomes fresh again.
- Future tokens: a completion with max_version > v (possible after a resume from a checkpoint
  older than the newest published weights) is held until v reaches it, so k = 0 stays strictly
  on-policy: every trained token comes from version v.
- Groups are kept whole: a group is usable once G distinct sample_index rows have arrived (they
  may span shards). A second row with the same (group_id, sample_index), or any row of a group
  already consumed, is a duplicate: dropped and counted, never trained twice.
- Wait rule: the trainer never takes step v while v - g > k, g = the newest version the
  generators are known to have picked up. We observe g as the largest max_version of any row
  read so far (a lower bound of the truth that needs no extra channel); a source that knows
  better may raise it with observe_generator_version(). Every eligible completion has
  min_version >= v - k, so with this g the rule is implied by the staleness rule; `may_step` is
  still checked before every step and its margin (`steps_ahead`) reported.

Counters satisfy, at every moment: offered = batched + dropped_stale + duplicates + pending.
Bad input: a shard from another run, without the trainer's columns, or with unscored rows raises
ShardRejected; the trainer skips it, counts it and writes the reason into its ledger.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

REQUIRED_COLUMNS = (
    "run_id",
    "group_id",
    "sample_index",
    "prompt_token_ids",
    "completion_token_ids",
    "logprobs",
    "min_version",
    "max_version",
    "finish_reason",
    "thinking_tokens",
    "answer_tokens",
    "reward",
    "passed",
)


class ShardRejected(Exception):
    """A shard the trainer must not train on (foreign run, other schema, corrupt, unscored)."""


class ShardSource(Protocol):
    """Where ready rollout shards come from (runtime/trainer_io.py implements it over a run store)."""

    def list_ready(self) -> list[str]:
        """Keys of every ready shard, in commit order."""
        ...

    def read(self, key: str) -> pa.Table:
        """The rollout table of one ready shard; ShardRejected if it must not be trained on."""
        ...

    def curriculum_version(self) -> int | None:
        """Version of the curriculum state the generators sample from (None before the first)."""
        ...

    # Optional: note_step(step) -> None. Called once a batch is taken, with the step the next
    # unread shard goes to (the generators' backpressure reads it; runtime/trainer_io.py).


def check_shard(table: pa.Table, run_id: str, key: str) -> None:
    """Raise ShardRejected unless `table` has the trainer's columns, rows of `run_id`, rewards."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ShardRejected(
            f"shard {key} lacks column(s) {missing}. Fix: train on a stage whose rows are scored "
            "rollouts (rollout schema v1)."
        )
    if table.num_rows == 0:
        return
    runs = set(table.column("run_id").unique().to_pylist())
    if runs != {run_id}:
        raise ShardRejected(
            f"shard {key} holds rows of run(s) {sorted(map(str, runs))}, not {run_id!r}. Fix: "
            "move it to the run that produced it; a trainer never trains on another run's data."
        )
    if table.column("reward").null_count:
        raise ShardRejected(
            f"shard {key} has {table.column('reward').null_count} unscored row(s) (reward null). "
            "Fix: point the trainer at the scored/filtered stage, not the raw generator output."
        )


def is_fresh(v: int, min_version: int, k: int) -> bool:
    """Staleness rule: tokens from min_version may be trained at step v iff v - min_version <= k."""
    return v - min_version <= k


def may_step(v: int, newest_generator_version: int | None, k: int) -> bool:
    """Wait rule: step v may run only if it is at most k steps ahead of the generators."""
    return newest_generator_version is not None and v - newest_generator_version <= k


@dataclass
class _Group:
    group_id: str
    parts: list[tuple[str, pa.Table]]  # (shard key, its rows of this group), read order
    sample_indices: set[int]
    min_version: int
    max_version: int

    @property
    def n(self) -> int:
        return len(self.sample_indices)


@dataclass
class Intake:
    """What happened to offered completions since the previous batch (reported with it)."""

    offered: int = 0
    dropped_stale: int = 0
    duplicates: int = 0
    shards_read: list[str] = field(default_factory=list)
    shards_rejected: dict[str, str] = field(default_factory=dict)
    stale_groups: dict[str, list[str]] = field(default_factory=dict)  # shard key -> group ids

    def as_dict(self) -> dict:
        return {
            "offered": self.offered,
            "dropped_stale": self.dropped_stale,
            "duplicates": self.duplicates,
            "shards_read": list(self.shards_read),
            "shards_rejected": dict(self.shards_rejected),
            "stale_groups": {k: list(v) for k, v in self.stale_groups.items()},
        }


@dataclass(frozen=True)
class Batch:
    """P whole groups for step `version`, plus the intake since the previous batch."""

    version: int
    table: pa.Table  # (P*G rows) groups contiguous, in buffer order
    shards: dict[str, list[str]]  # shard key -> group ids trained from it (the ledger)
    staleness: dict[int, int]  # v - min_version -> number of completions
    intake: Intake


class BatchAssembler:
    """Buffers groups from ready shards and hands out batches that obey the staleness rule."""

    def __init__(
        self,
        run_id: str,
        *,
        prompts_per_batch: int,
        samples_per_prompt: int,
        max_off_policy_steps: int,
    ) -> None:
        self.run_id = run_id
        self.P, self.G, self.k = prompts_per_batch, samples_per_prompt, max_off_policy_steps
        self._groups: dict[str, _Group] = {}  # insertion order = buffer order
        self._read: list[str] = []
        self._read_set: set[str] = set()
        self._consumed: set[str] = set()
        self.newest_generator_version: int | None = None
        self.intake = Intake()
        self.totals: Counter[str] = Counter()

    # -- intake ------------------------------------------------------------------------------

    def is_read(self, key: str) -> bool:
        return key in self._read_set

    def reject(self, key: str, reason: str) -> None:
        """Record a shard that must not be trained on; it is never read again."""
        self._mark_read(key)
        self.intake.shards_rejected[key] = reason
        self.totals["shards_rejected"] += 1

    def add(self, key: str, table: pa.Table) -> None:
        """Buffer the rows of a ready shard (each key once, in commit order)."""
        if self.is_read(key):
            raise ValueError(f"shard {key} was already added. Fix: add each ready shard once.")
        try:
            check_shard(table, self.run_id, key)
        except ShardRejected as e:
            self.reject(key, str(e))
            raise
        self._mark_read(key)
        self.intake.offered += table.num_rows
        self.totals["offered"] += table.num_rows
        duplicates = self._buffer(key, table, only=None)
        self.intake.duplicates += duplicates
        self.totals["duplicates"] += duplicates
        if table.num_rows:
            seen = int(pc.max(table.column("max_version")).as_py())
            self.observe_generator_version(seen)

    def observe_generator_version(self, version: int) -> None:
        """Raise the known newest generator version g (never lowers it)."""
        if self.newest_generator_version is None or version > self.newest_generator_version:
            self.newest_generator_version = version

    def _mark_read(self, key: str) -> None:
        self._read.append(key)
        self._read_set.add(key)
        self.intake.shards_read.append(key)

    def _buffer(self, key: str, table: pa.Table, only: set[str] | None) -> int:
        """Add rows to their groups; returns the number of duplicate rows dropped."""
        gids = table.column("group_id").to_pylist()
        sidx = table.column("sample_index").to_pylist()
        vmin = table.column("min_version").to_pylist()
        vmax = table.column("max_version").to_pylist()
        rows: dict[str, list[int]] = {}
        duplicates = 0
        for i, gid in enumerate(gids):
            if only is not None and gid not in only:
                continue
            group = self._groups.get(gid)
            if gid in self._consumed or (group is not None and sidx[i] in group.sample_indices):
                duplicates += 1
                continue
            if group is None:
                group = self._groups[gid] = _Group(gid, [], set(), vmin[i], vmax[i])
            group.sample_indices.add(sidx[i])
            group.min_version = min(group.min_version, vmin[i])
            group.max_version = max(group.max_version, vmax[i])
            rows.setdefault(gid, []).append(i)
        for gid, idx in rows.items():
            self._groups[gid].parts.append((key, table.take(pa.array(idx, pa.int64()))))
        return duplicates

    # -- batches -----------------------------------------------------------------------------

    def usable_groups(self, v: int) -> int:
        """Complete, fresh groups that step v could train on now."""
        return sum(1 for g in self._groups.values() if self._usable(g, v))

    def _usable(self, g: _Group, v: int) -> bool:
        return g.n >= self.G and is_fresh(v, g.min_version, self.k) and g.max_version <= v

    def drop_stale(self, v: int) -> int:
        """Drop (and count) every buffered group with a completion too old for step v."""
        dropped = 0
        for gid in [
            gid for gid, g in self._groups.items() if not is_fresh(v, g.min_version, self.k)
        ]:
            group = self._groups.pop(gid)
            self._consumed.add(gid)
            dropped += group.n
            for key in dict.fromkeys(k for k, _ in group.parts):
                self.intake.stale_groups.setdefault(key, []).append(gid)
        self.intake.dropped_stale += dropped
        self.totals["dropped_stale"] += dropped
        return dropped

    def take(self, v: int) -> Batch | None:
        """The next P usable groups for step v (stale groups dropped first); None if too few."""
        self.drop_stale(v)
        chosen = [gid for gid, g in self._groups.items() if self._usable(g, v)][: self.P]
        if len(chosen) < self.P or not may_step(v, self.newest_generator_version, self.k):
            return None
        parts, shards, staleness = [], {}, Counter()
        for gid in chosen:
            group = self._groups.pop(gid)
            self._consumed.add(gid)
            for key, rows in group.parts:
                parts.append(rows)
                shards.setdefault(key, [])
                if gid not in shards[key]:
                    shards[key].append(gid)
                staleness.update(v - m for m in rows.column("min_version").to_pylist())
        table = pa.concat_tables(parts, promote_options="permissive")
        self.totals["batched"] += table.num_rows
        intake, self.intake = self.intake, Intake()
        return Batch(v, table, shards, dict(sorted(staleness.items())), intake)

    @property
    def pending(self) -> int:
        """Completions buffered but not yet batched or dropped."""
        return sum(g.n for g in self._groups.values())

    # -- checkpoint state --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain-data state: with the same shards, restore() rebuilds an identical buffer."""
        return {
            "shards_read": list(self._read),
            "pending": [
                [gid, list(dict.fromkeys(k for k, _ in g.parts))] for gid, g in self._groups.items()
            ],
            "consumed_groups": sorted(self._consumed),
            "newest_generator_version": self.newest_generator_version,
            "intake": self.intake.as_dict(),
            "totals": dict(self.totals),
        }

    def restore(self, state: dict, read) -> None:
        """Load state_dict() output; `read(key)` re-reads the shards that hold pending groups."""
        self._read = list(state["shards_read"])
        self._read_set = set(self._read)
        self._consumed = set(state["consumed_groups"])
        self.newest_generator_version = state["newest_generator_version"]
        self.totals = Counter(state["totals"])
        self.intake = Intake(**state["intake"])
        pending = [gid for gid, _ in state["pending"]]
        wanted = set(pending)
        needed = dict.fromkeys(k for _, keys in state["pending"] for k in keys)
        self._groups = {}
        for key in [k for k in self._read if k in needed]:  # original read order
            self._buffer(key, read(key), only=wanted)
        missing = wanted - set(self._groups)
        if missing:
            raise ValueError(
                f"checkpoint lists {len(missing)} pending group(s) (e.g. {sorted(missing)[0]}) "
                "that its shards no longer hold. Fix: restore the run's shards, or resume from "
                "an earlier checkpoint."
            )
        self._groups = {gid: self._groups[gid] for gid in pending}


def rollout_stats(table: pa.Table) -> dict[str, float]:
    """Batch-level rollout metrics: pass rate, rewards, lengths, truncation and interruption,
    and completions whose scorer failed (an error, a timeout or a crash, not a wrong answer)."""
    from scalerl.stall import count_scorer_failures

    n = max(table.num_rows, 1)

    def mean(col: str) -> float:
        return float(pc.mean(table.column(col)).as_py() or 0.0) if table.num_rows else 0.0

    reasons = table.column("finish_reason")
    return {
        "pass_rate": float(pc.sum(table.column("passed").cast(pa.int64())).as_py() or 0) / n,
        "reward_mean": mean("reward"),
        "prompt_len_mean": float(
            pc.mean(pc.list_value_length(table.column("prompt_token_ids"))).as_py() or 0.0
        ),
        "completion_len_mean": float(
            pc.mean(pc.list_value_length(table.column("completion_token_ids"))).as_py() or 0.0
        ),
        "thinking_tokens_mean": mean("thinking_tokens"),
        "answer_tokens_mean": mean("answer_tokens"),
        "truncation_rate": float(pc.sum(pc.equal(reasons, "length")).as_py() or 0) / n,
        "interruption_rate": float(pc.sum(pc.equal(reasons, "interrupted")).as_py() or 0) / n,
        "reward_scorer_errors": count_scorer_failures(table),
    }
