"""No-Positive-Resampling: the ScaleRL data curriculum (SCALERL.md sec. 5; paper sec. 3.2).

The paper keeps a history of per-prompt pass rates and permanently removes a prompt
whose pass rate reaches >= 0.9 from later epochs: prompts the policy already solves
almost always give (near) zero-variance groups and waste generation compute.

Usage::

    cur = NoPositiveResampling(prompt_ids, pass_rate_threshold=0.9, seed=0)
    batch = cur.sample(48)                      # active prompt ids, seeded
    cur.update(pid, [True, False, ...])         # one group's outcome -> True if retired now
    cur.retire(saved_state["retired"])          # apply retirements decided elsewhere
    state = cur.state_dict()                    # JSON-serializable; part of the run state
    cur = NoPositiveResampling.from_state_dict(state)

Sampling. An epoch is one shuffled pass over the prompts that were active when it
began (the shuffle is seeded by (seed, epoch), so it depends only on the seed, the
epoch number and which prompts are active). ``sample(n)`` hands out the next n
prompts of that pass, skipping prompts retired since the epoch began, and wraps into
the next epoch when the pass is used up; so one call may return a prompt twice when
n exceeds the number of active prompts.

Pass rate (our precise reading of "pass rate"). Every group recorded by ``update``
is tagged with the epoch its prompt was sampled in: ``update(..., epoch=e)`` when the
caller knows it, else the epoch in which this instance's ``sample`` last handed the
prompt out, else no tag. A prompt's ``pass_rate`` is passed / total pooled over the
groups that carry the same tag as its latest group; an untagged latest group counts
alone. In the normal case (one group of G completions per prompt per epoch) that is
exactly the pass rate of the prompt's latest group, as in the paper; pooling only
matters when several groups of one prompt land in the same epoch. Older groups stay
in ``history`` but do not count: a prompt is judged on its latest epoch's evidence.

Retirement is checked on every update: pass_rate >= pass_rate_threshold retires the
prompt at once (it is never returned by ``sample`` again, also not later in the
current epoch). Groups for an already retired prompt (in flight when it retired) are
recorded in the history but change nothing.

Split processes. When one process samples (the generator) and another records
outcomes (a curriculum-update task), the updater's state is the source of truth for
retirements; the sampler applies them with ``retire(state["retired"])`` before it
samples again, keeping its own epoch order.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

_STATE_FORMAT = 1
# Pooled pass rates are ratios of small integers; the tolerance keeps 9/10 >= 0.9 true
# whatever the rounding of the threshold literal.
_RATE_TOL = 1e-12


class CurriculumExhausted(RuntimeError):
    """Every prompt has been retired: there is nothing left to sample."""


class NoPositiveResampling:
    """Seeded epoch sampler that permanently retires prompts with pass rate >= threshold."""

    def __init__(
        self,
        prompt_ids: Sequence[str],
        *,
        pass_rate_threshold: float = 0.9,
        seed: int = 0,
    ) -> None:
        ids = [str(p) for p in prompt_ids]
        if not ids:
            raise ValueError(
                "NoPositiveResampling got no prompt ids. Fix: pass the training prompts' ids."
            )
        if len(set(ids)) != len(ids):
            dup = sorted(p for p, c in Counter(ids).items() if c > 1)[:5]
            raise ValueError(
                f"prompt ids must be unique; duplicates found {dup}. "
                "Fix: deduplicate the prompt set or derive ids from the row index."
            )
        if not 0.0 < float(pass_rate_threshold) <= 1.0:
            raise ValueError(
                f"pass_rate_threshold must be in (0, 1], got {pass_rate_threshold}. "
                "Fix: use the paper's 0.9, or 1.0 to retire only always-solved prompts."
            )
        self.prompt_ids: list[str] = ids
        self.pass_rate_threshold = float(pass_rate_threshold)
        self.seed = int(seed)
        self.epoch = 0
        self.version = 0
        self._index = {p: i for i, p in enumerate(ids)}
        self._retired: set[str] = set()
        self._history: dict[str, list[tuple[int | None, int, int]]] = {}
        self._last_sampled_epoch: dict[str, int] = {}
        self._order: list[str] = self._shuffled_active(0)
        self._position = 0

    # ----------------------------------------------------------------- queries
    @property
    def active_ids(self) -> list[str]:
        """Prompts still in the curriculum, in their original order."""
        return [p for p in self.prompt_ids if p not in self._retired]

    @property
    def retired_ids(self) -> list[str]:
        """Prompts permanently removed, in their original order."""
        return [p for p in self.prompt_ids if p in self._retired]

    @property
    def exhausted(self) -> bool:
        return len(self._retired) == len(self.prompt_ids)

    def pass_rate(self, prompt_id: str) -> float | None:
        """Pooled pass rate over the groups of the prompt's latest epoch; None if unseen."""
        history = self._history.get(self._check_id(prompt_id))
        if not history:
            return None
        latest = history[-1][0]
        groups = [history[-1]] if latest is None else [g for g in history if g[0] == latest]
        return sum(g[1] for g in groups) / sum(g[2] for g in groups)

    def history(self, prompt_id: str) -> list[tuple[int | None, int, int]]:
        """Every recorded group of the prompt as (epoch or None, passed, total), oldest first."""
        return list(self._history.get(self._check_id(prompt_id), []))

    # ---------------------------------------------------------------- sampling
    def sample(self, n: int) -> list[str]:
        """The next n active prompt ids of the seeded epoch order (may wrap into new epochs)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"sample(n) needs an int n >= 0, got {n!r}. Fix: pass e.g. 48.")
        if self.exhausted:
            raise CurriculumExhausted(self._exhausted_message())
        out: list[str] = []
        while len(out) < n:
            if self._position >= len(self._order):
                self._start_epoch(self.epoch + 1)
                continue
            pid = self._order[self._position]
            self._position += 1
            if pid in self._retired:
                continue
            self._last_sampled_epoch[pid] = self.epoch
            out.append(pid)
        return out

    def update(
        self,
        prompt_id: str,
        passes: Sequence[bool] | int,
        total: int | None = None,
        *,
        epoch: int | None = None,
    ) -> bool:
        """Record one group's outcome; return True if this update retired the prompt.

        ``passes`` is either the per-completion pass flags (``total`` then defaults to
        their number) or the count of passing completions together with ``total``.
        ``epoch``: the epoch the group's prompt was sampled in, if the caller knows it.
        """
        pid = self._check_id(prompt_id)
        passed, total = _count(passes, total)
        tag = int(epoch) if epoch is not None else self._last_sampled_epoch.get(pid)
        self._history.setdefault(pid, []).append((tag, passed, total))
        self.version += 1
        if pid in self._retired:
            return False
        rate = self.pass_rate(pid)
        if rate is not None and rate >= self.pass_rate_threshold - _RATE_TOL:
            self._retired.add(pid)
            return True
        return False

    def retire(self, prompt_ids: Iterable[str]) -> list[str]:
        """Retire prompts decided elsewhere (e.g. another process's state); the new ones."""
        new = [self._check_id(p) for p in prompt_ids if p not in self._retired]
        new = list(dict.fromkeys(new))
        if new:
            self._retired.update(new)
            self.version += 1
        return new

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (JSON-serializable)."""
        return {
            "format": _STATE_FORMAT,
            "prompt_ids": list(self.prompt_ids),
            "pass_rate_threshold": self.pass_rate_threshold,
            "seed": self.seed,
            "epoch": self.epoch,
            "version": self.version,
            "order": list(self._order),
            "position": self._position,
            "retired": self.retired_ids,
            "history": {p: [list(g) for g in h] for p, h in self._history.items()},
            "last_sampled_epoch": dict(self._last_sampled_epoch),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by ``state_dict`` (validates it against our prompts)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(
                f"curriculum state is missing {missing}. "
                "Fix: pass a dict produced by NoPositiveResampling.state_dict()."
            )
        if state["format"] != _STATE_FORMAT:
            raise ValueError(
                f"curriculum state has format {state['format']}, this code reads "
                f"{_STATE_FORMAT}. Fix: resume with the code version that wrote it."
            )
        if list(state["prompt_ids"]) != self.prompt_ids:
            raise ValueError(
                "curriculum state was saved for a different prompt set. Fix: build the "
                "curriculum with the same prompt ids (or use from_state_dict)."
            )
        known = self._index
        unknown = [
            p for p in (*state["order"], *state["retired"], *state["history"]) if p not in known
        ]
        if unknown:
            raise ValueError(
                f"curriculum state names unknown prompt ids {unknown[:5]}. "
                "Fix: the state is corrupt or from another run; do not mix run states."
            )
        self.pass_rate_threshold = float(state["pass_rate_threshold"])
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.version = int(state["version"])
        self._order = [str(p) for p in state["order"]]
        self._position = int(state["position"])
        self._retired = {str(p) for p in state["retired"]}
        self._history = {
            str(p): [(None if e is None else int(e), int(a), int(t)) for e, a, t in h]
            for p, h in state["history"].items()
        }
        self._last_sampled_epoch = {str(p): int(e) for p, e in state["last_sampled_epoch"].items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> NoPositiveResampling:
        if "prompt_ids" not in state:
            raise ValueError(
                "curriculum state has no 'prompt_ids'. "
                "Fix: pass a dict produced by NoPositiveResampling.state_dict()."
            )
        cur = cls(
            state["prompt_ids"],
            pass_rate_threshold=state.get("pass_rate_threshold", 0.9),
            seed=state.get("seed", 0),
        )
        cur.load_state_dict(state)
        return cur

    # ----------------------------------------------------------------- helpers
    def _check_id(self, prompt_id: str) -> str:
        if prompt_id not in self._index:
            raise KeyError(
                f"unknown prompt id {prompt_id!r}: not in this curriculum's "
                f"{len(self.prompt_ids)} prompts. Fix: update only ids that sample() "
                "returned, or build the curriculum over the same prompt set."
            )
        return prompt_id

    def _shuffled_active(self, epoch: int) -> list[str]:
        order = self.active_ids
        # A string seed is hashed with SHA-512 by random.Random: stable across runs/platforms.
        random.Random(f"npr:{self.seed}:{epoch}").shuffle(order)
        return order

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = self._shuffled_active(epoch)
        self._position = 0

    def _exhausted_message(self) -> str:
        return (
            f"every prompt is retired: all {len(self.prompt_ids)} prompts reached a pass rate "
            f">= {self.pass_rate_threshold} (No-Positive-Resampling), so there is nothing left "
            "to sample. The run can end here; to keep training, add harder prompts or raise "
            "pass_rate_threshold (e.g. to 1.0)."
        )


_STATE_KEYS = (
    "format",
    "prompt_ids",
    "pass_rate_threshold",
    "seed",
    "epoch",
    "version",
    "order",
    "position",
    "retired",
    "history",
    "last_sampled_epoch",
)


def _count(passes: Sequence[bool] | int, total: int | None) -> tuple[int, int]:
    if isinstance(passes, bool):
        raise TypeError(
            "update() got a single bool for passes. Fix: pass the group's list of pass "
            "flags, or the number of passing completions together with total=G."
        )
    if isinstance(passes, int):
        if total is None:
            raise ValueError(
                "update() got a pass count without total. Fix: pass total=G (group size)."
            )
        passed = passes
    else:
        flags = list(passes)
        if total is not None and total != len(flags):
            raise ValueError(
                f"update() got {len(flags)} pass flags but total={total}. "
                "Fix: omit total when passing flags."
            )
        passed, total = sum(bool(f) for f in flags), len(flags)
    total = int(total)
    if total <= 0 or not 0 <= passed <= total:
        raise ValueError(
            f"update() needs 0 <= passed <= total and total > 0, got passed={passed}, "
            f"total={total}. Fix: record a non-empty group's outcome."
        )
    return int(passed), total
