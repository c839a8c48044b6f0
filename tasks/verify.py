"""Check a run's integrity from its stored data alone (the failure contract of DESIGN.md).

    report = verify_run(open_store(url).run(run_id))
    report.ok, report.problems, report.facts

- no committed shard lost: every shard a trainer step consumed is still committed, and every
  raw shard reached the scored and filtered stages (once the run has finished);
- nothing trained on twice: across the ledger of the newest checkpoint, every group appears in
  at most one step;
- trainer steps and weight versions continuous: versions 0..N are all published, and the ledger
  holds one 'trained' entry per step 1..checkpoint step;
- curriculum retirements never undone: each committed curriculum version retires a superset of
  the previous one's prompts, and every version applies one more shard than the last;
- quarantined shards (Run.quarantine_shard: unusable input taken out of use, with a reason)
  are accounted for, not lost: a key quarantined at any stage needs no later stage, a consumed
  shard may have been quarantined by the trainer, and every quarantine entry still holds the
  copies its reason record names. They are listed in `quarantined` and `notes`.
No Prefect import: the CLI and the tests use it directly.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from storage import Run


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    facts: dict[str, int] = field(default_factory=dict)
    quarantined: list[dict] = field(default_factory=list)  # reason records, oldest first

    @property
    def notes(self) -> list[str]:
        """One line per quarantined shard: where, why, and where its copy lies."""
        return [
            f"quarantined {q['stage']}/{q['key']} by {q.get('by') or '?'}: "
            f"{q.get('error') or 'reason'}: {q['reason'].split(' Fix:')[0]} "
            f"(copy: {q.get('data_copy') or q.get('record_copy')})"
            for q in self.quarantined
        ]

    @property
    def ok(self) -> bool:
        return not self.problems


def _ledger(run: Run) -> tuple[int | None, list[dict]]:
    step = run.latest_checkpoint_step()
    if step is None:
        return None, []
    with tempfile.TemporaryDirectory(prefix="scalerl-verify-") as tmp:
        local = run.load_checkpoint(step, Path(tmp))
        lines = (Path(local) / "ledger.jsonl").read_text(encoding="utf-8").splitlines()
    return step, [json.loads(line) for line in lines if line.strip()]


def verify_run(run: Run) -> VerifyReport:
    report = VerifyReport()
    stages = {
        stage: {s.key for s in run.list_shards(stage)} for stage in ("raw", "scored", "filtered")
    }
    report.quarantined = run.list_quarantined()
    quarantined = {stage: set() for stage in ("raw", "scored", "filtered")}
    for q in report.quarantined:
        quarantined.setdefault(q["stage"], set()).add(q["key"])
    anywhere = set().union(*quarantined.values())
    report.problems += run.quarantine_problems()
    finished = (run.read_status() or {}).get("state") == "finished"
    for later in ("scored", "filtered"):
        orphans = stages[later] - stages["raw"] - quarantined["raw"]
        if orphans:
            report.problems.append(
                f"{len(orphans)} {later} shard(s) without their raw input, e.g. {sorted(orphans)[0]}"
            )
        missing = stages["raw"] - stages[later] - anywhere
        if finished and missing:
            report.problems.append(
                f"{len(missing)} raw shard(s) never reached {later}, e.g. {sorted(missing)[0]}"
            )

    step, ledger = _ledger(run)
    groups = Counter(g for entry in ledger for gs in entry["groups"].values() for g in gs)
    twice = [g for g, n in groups.items() if n > 1]
    if twice:
        report.problems.append(
            f"{len(twice)} group(s) consumed by more than one step, e.g. {twice[0]}"
        )
    read = {key for entry in ledger for key in entry["shards_read"]}
    lost = read - stages["filtered"] - quarantined["filtered"]
    if lost:
        report.problems.append(
            f"{len(lost)} consumed shard(s) are no longer committed, e.g. {sorted(lost)[0]}"
        )
    trained = [entry["version"] for entry in ledger if entry["outcome"] == "trained"]
    if step is not None and trained != list(range(step)):
        report.problems.append(
            f"trained steps in the ledger are {trained[:5]}..., expected 0..{step - 1} once each"
        )

    versions = run.list_weight_versions()
    if versions and versions != list(range(versions[-1] + 1)):
        report.problems.append(f"weight versions are not continuous: {versions}")
    if step is not None and (not versions or versions[-1] < step):
        report.problems.append(
            f"checkpoint step {step} but the newest weights are {versions[-1] if versions else None}"
        )

    retired: set[str] = set()
    applied = -1
    for version in run.list_curriculum_versions():
        _, state = run.load_curriculum(version)
        now = set(state["sampler"]["retired"])
        if not retired <= now:
            report.problems.append(f"curriculum v{version} un-retired {sorted(retired - now)[:3]}")
        if len(state["applied"]) != applied + 1 and applied >= 0:
            report.problems.append(
                f"curriculum v{version} applies {len(state['applied'])} shards after {applied}"
            )
        retired, applied = now, len(state["applied"])
    report.facts = {
        "raw_shards": len(stages["raw"]),
        "filtered_shards": len(stages["filtered"]),
        "checkpoint_step": step or 0,
        "ledger_entries": len(ledger),
        "groups_consumed": len(groups),
        "weight_versions": len(versions),
        "prompts_retired": len(retired),
        "quarantined_shards": len(report.quarantined),
        "quarantine_pending": sum(
            q["key"] in stages.get(q["stage"], ()) for q in report.quarantined
        ),
    }
    return report
