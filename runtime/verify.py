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
- and, from the trainer's checkpoint and the shards themselves (_trainer_problems,
  _lineage_problems, _curriculum_problems): the trainer's read log agrees with its ledger and
  reads no shard twice; every group of every shard it read was trained, dropped as stale or is
  pending in the checkpoint, and every trained group is in the shard the ledger names; no
  filtered shard was skipped while a later one was read; ledger entries follow the versions one
  by one, every step has its metrics row, and a finished run has no weights beyond its last
  checkpoint; curriculum versions are continuous, each one's applied list extends the previous
  one's by one key, no key twice, every applied key is a scored shard, and once the run has
  finished every scored shard is applied;
- quarantined shards (Run.quarantine_shard: unusable input taken out of use, with a reason)
  are accounted for, not lost: a key quarantined at any stage needs no later stage, a consumed
  shard may have been quarantined by the trainer, and every quarantine entry still holds the
  copies its reason record names. They are listed in `quarantined` and `notes`;
- nothing stored is gone (_loss_problems; one PROBLEM line per missing thing, at most
  MAX_LINES per kind): weight versions 0..N all have their manifest, and the weights a run
  needs (the latest, every version the eval metrics name) and every checkpoint still hold each
  file of their manifest at its size; every committed shard of every stage (raw, scored,
  filtered, eval) still has its data file at the size of its commit record; a raw shard whose
  scored or filtered commit record is gone (finished run), and an evaluated version without its
  eval shard, are named. A checkpoint quarantined by a resuming trainer
  (Run.quarantine_checkpoint) is a note, not a problem, if its copies are complete;
- content (verify_run(content=True), the default; `scalerl runs verify --fast` passes False):
  every committed shard's data file and every file of the weights and checkpoints above whose
  size is right is read whole and hashed against the sha256 its manifest or commit record
  holds (a shard committed before records carried one: its CRC-32, counted in a remark); one
  PROBLEM line per file whose content differs (bit rot at the same size). The facts
  files_hashed and bytes_hashed say how much was read. --fast reads only listings with sizes
  and the small manifests and commit records (plus the newest checkpoint's ledger.jsonl and
  trainer_state.json, always sha256-checked), and says in a remark that it checked sizes only;
- a damaged curriculum file (truncated, not JSON, without its version, state, applied list or
  sampler) is one PROBLEM line naming it and the fix (a resume rebuilds it); the checks of the
  curriculum run over the intact versions, and a damaged newest version stands for the scored
  shards it lacked;
- steps redone after a resume from an older checkpoint (or written twice) are not a problem:
  every reader sees the last row written per step (Run.read_metrics); the facts
  trainer_steps_redone and trainer_rows_replaced count them, and `notes` says so.
No Prefect import: the CLI and the tests use it directly.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from storage import Run
from storage.dirs import DamagedEntryError
from storage.store import latest_metrics


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    facts: dict[str, int] = field(default_factory=dict)
    quarantined: list[dict] = field(default_factory=list)  # reason records, oldest first
    remarks: list[str] = field(default_factory=list)  # facts worth a line, not problems

    @property
    def notes(self) -> list[str]:
        """One line per quarantined shard (where, why, where its copy lies), then the remarks
        (e.g. trainer steps redone after a resume)."""
        return [
            f"quarantined {q['stage']}/{q['key']} by {q.get('by') or '?'}: "
            f"{q.get('error') or 'reason'}: {q['reason'].split(' Fix:')[0]} "
            f"(copy: {q.get('data_copy') or q.get('record_copy')})"
            for q in self.quarantined
        ] + self.remarks

    @property
    def ok(self) -> bool:
        return not self.problems


MAX_LINES = 10  # PROBLEM lines per kind of loss; then one line with the count of the rest


def _checkpoint(run: Run) -> tuple[int | None, list[dict], dict]:
    """(step, ledger, batch assembler state) of the newest checkpoint whose ledger and trainer
    state are intact (only those two files are downloaded; a checkpoint damaged elsewhere is
    reported by _loss_problems); (None, [], {}) if none."""
    for step in reversed(run.list_checkpoints()):
        with tempfile.TemporaryDirectory(prefix="scalerl-verify-") as tmp:
            try:
                local = Path(run.load_checkpoint(step, Path(tmp), files=_LEDGER, checksum=True))
            except DamagedEntryError:
                continue
            lines = (local / "ledger.jsonl").read_text(encoding="utf-8").splitlines()
            state = json.loads((local / "trainer_state.json").read_text(encoding="utf-8"))
        ledger = [json.loads(line) for line in lines if line.strip()]
        return step, ledger, state.get("assembler", {})
    return None, [], {}


_LEDGER = ["ledger.jsonl", "trainer_state.json"]


def verify_run(run: Run, *, content: bool = True) -> VerifyReport:
    """The checks of the module docstring. `content`: hash every committed shard data file
    and every file of the weights and checkpoints checked (False: `runs verify --fast`, sizes
    only, which says so in `remarks`)."""
    report = VerifyReport()
    stages = {
        stage: {s.key for s in run.list_shards(stage)} for stage in ("raw", "scored", "filtered")
    }
    data = {stage: set(_data_files(run, stage)) for stage in ("scored", "filtered")}
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
            report.problems += _capped(
                [
                    f"raw shard {key} never reached {later}: {later} shard {key} is missing "
                    f"(shards/{later}/commits/{key}.json not found"
                    + ("; its data file is still there)" if key in data[later] else ")")
                    for key in sorted(missing)
                ],
                f"raw shard(s) never reached {later}",
            )

    step, ledger, assembler = _checkpoint(run)
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
    more: dict[str, int] = {}
    report.problems += _loss_problems(
        run, step, versions, quarantined, report.remarks, more, content
    )
    if step is not None and (not versions or versions[-1] < step):
        report.problems.append(
            f"checkpoint step {step} but the newest weights are {versions[-1] if versions else None}"
        )

    retired: set[str] = set()
    applied, last = -1, -1
    curriculum = _curriculum_states(run, finished)  # a damaged file: one line, then skipped
    report.problems += curriculum.problems
    for version, state in curriculum.states:
        now = set(state["sampler"].get("retired") or [])
        if not retired <= now:
            report.problems.append(f"curriculum v{version} un-retired {sorted(retired - now)[:3]}")
        if len(state["applied"]) != applied + 1 and applied >= 0 and version == last + 1:
            report.problems.append(
                f"curriculum v{version} applies {len(state['applied'])} shards after {applied}"
            )
        retired, applied, last = now, len(state["applied"]), version
    report.problems += _trainer_problems(run, ledger, assembler, more)
    report.problems += _lineage_problems(run, step, ledger, versions, finished, more)
    if more.get("trainer_steps_redone"):
        report.remarks.append(
            f"{more['trainer_steps_redone']} trainer step(s) were trained again after a resume "
            f"from an older checkpoint; their {more['trainer_rows_replaced']} earlier metrics "
            "row(s) are replaced by the last written (read_metrics: one row per step)"
        )
    report.problems += _curriculum_problems(curriculum, stages["scored"], anywhere, finished, more)
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
        **more,
    }
    return report


def _trainer_problems(run: Run, ledger: list[dict], assembler: dict, facts: dict) -> list[str]:
    """Nothing read twice, nothing read and then lost, nothing skipped (checkpoint + shards)."""
    if not assembler:
        return []
    problems = []
    # The read log: every shard the trainer read, in order; the ledger holds each batch's
    # reads, the checkpoint's intake those since the last batch. Both must tell one story.
    logged = [k for entry in ledger for k in entry["shards_read"]]
    logged += assembler["intake"]["shards_read"]
    if logged != assembler["shards_read"]:
        problems.append(
            f"the trainer's read log ({len(assembler['shards_read'])} shards) and its ledger "
            f"({len(logged)} reads) disagree"
        )
    twice = sorted(k for k, n in Counter(assembler["shards_read"]).items() if n > 1)
    if twice:
        problems.append(
            f"{len(twice)} shard(s) read by the trainer more than once, e.g. {twice[0]}"
        )

    # Every group of every shard read is trained, dropped as stale or pending, and every
    # trained group is in the shard the ledger says it came from.
    trained: dict[str, set[str]] = {}
    accounted: set[str] = set()
    for entry in [*ledger, {"groups": {}, **assembler["intake"]}]:
        for key, gids in entry["groups"].items():
            trained.setdefault(key, set()).update(gids)
            accounted.update(gids)
        for gids in entry.get("stale_groups", {}).values():
            accounted.update(gids)
    pending = {gid for gid, _ in assembler["pending"]}
    accounted |= pending
    rejected = {k for entry in ledger for k in entry.get("shards_rejected", {})}
    rejected |= set(assembler["intake"].get("shards_rejected", {}))
    order = [s.key for s in run.list_shards("filtered")]
    lost, phantom = [], []
    for key in dict.fromkeys(assembler["shards_read"]):
        if key in rejected or key not in order:  # quarantined, or lost (reported above)
            continue
        gids = set(run.read_shard("filtered", key).column("group_id").to_pylist())
        lost += sorted(gids - accounted)
        phantom += sorted(trained.get(key, set()) - gids)
    if lost:
        problems.append(
            f"{len(lost)} group(s) of shards the trainer read were neither trained, dropped as "
            f"stale nor pending, e.g. {lost[0]}"
        )
    if phantom:
        problems.append(
            f"{len(phantom)} trained group(s) are not in the shard the ledger names, e.g. "
            f"{phantom[0]}"
        )

    # The trainer reads filtered shards in commit order (one writer: the run flow), so what it
    # has read is a prefix of that order; a committed shard before the last one read and not
    # read itself was skipped.
    read = set(assembler["shards_read"])
    last = max((i for i, key in enumerate(order) if key in read), default=-1)
    skipped = [key for key in order[:last] if key not in read]
    if skipped:
        problems.append(
            f"{len(skipped)} filtered shard(s) were skipped by the trainer while later ones were "
            f"read, e.g. {skipped[0]}"
        )
    facts.update(
        shards_read_by_trainer=len(read),
        groups_dropped_stale=sum(
            len(g) for e in ledger for g in e.get("stale_groups", {}).values()
        ),
        groups_pending=len(pending),
    )
    return problems


def _lineage_problems(
    run: Run,
    step: int | None,
    ledger: list[dict],
    versions: list[int],
    finished: bool,
    facts: dict,
) -> list[str]:
    """Steps and versions move one at a time, and every step left its metrics row. Counts
    into `facts` the steps with more than one metrics row (redone after a resume, or written
    twice) and the rows the last one replaces: not a problem, every reader sees one per step."""
    every = run.read_metrics("trainer", all_rows=True)
    metrics = latest_metrics("trainer", every)
    steps = every.column("step").to_pylist() if "step" in every.column_names else []
    counts = Counter(s for s in steps if s is not None)
    facts["trainer_steps_redone"] = sum(n > 1 for n in counts.values())
    facts["trainer_rows_replaced"] = sum(n - 1 for n in counts.values())
    if step is None:
        return []
    problems = []
    done = 0  # versions trained so far: a batch without a step (zero variance, NaN) keeps it
    for i, entry in enumerate(ledger):
        if entry["version"] != done:
            problems.append(
                f"ledger entry {i} trains version {entry['version']} after {done} step(s)"
            )
            break
        done += entry["outcome"] == "trained"
    if finished and versions and versions[-1] != step:
        problems.append(
            f"the run finished at checkpoint step {step} but weights v{versions[-1]} exist "
            "(left by a trainer that died after publishing them)"
        )
    logged = set(metrics.column("step").to_pylist()) if "step" in metrics.column_names else set()
    missing = sorted(set(range(1, step + 1)) - logged)
    if missing:
        problems.append(f"{len(missing)} trainer step(s) without a metrics row, e.g. {missing[0]}")
    return problems


@dataclass
class _Curriculum:
    """The run's curriculum files: every version listed, the intact ones with their state, one
    problem line per damaged file, and whether one newer than every intact version is damaged
    (its lines then stand for what follows from it: a resume rebuilds it)."""

    versions: list[int]
    states: list[tuple[int, dict]]
    problems: list[str]
    newest_damaged: bool


def _curriculum_states(run: Run, finished: bool) -> _Curriculum:
    from storage.store import DamagedCurriculumError

    versions, states, problems = run.list_curriculum_versions(), [], []
    for version in versions:
        try:
            states.append(run.load_curriculum(version))
        except DamagedCurriculumError as e:  # the fix a finished run can use
            problems.append(run.curriculum_damage_message(version, e.damage, finished))
        except LookupError:  # moved aside by a writer meanwhile
            continue
    newest = bool(versions) and (not states or states[-1][0] != versions[-1])
    return _Curriculum(versions, states, _capped(problems, "curriculum files damaged"), newest)


def _curriculum_problems(
    curriculum: _Curriculum,
    scored: set[str],
    quarantined: set[str],
    finished: bool,
    facts: dict,
) -> list[str]:
    """Curriculum versions in a row, each applying exactly one new scored shard (a damaged
    version is named by _curriculum_states; the intact versions on either side of it are not
    compared with each other; a gap of missing files is)."""
    problems = []
    versions = curriculum.versions
    if versions and versions != list(range(versions[-1] + 1)):
        problems.append(f"curriculum versions are not continuous: {versions[:10]}")
    before: list[str] = []
    last = -1
    damaged = set(versions) - {version for version, _ in curriculum.states}
    for version, state in curriculum.states:
        applied = state["applied"]
        if (
            version
            and not damaged.intersection(range(last + 1, version))  # none damaged between
            and (applied[:-1] != before or len(applied) != len(before) + 1)
        ):
            problems.append(
                f"curriculum v{version} does not extend v{version - 1}'s applied shards by one"
            )
            break
        before, last = applied, version
    twice = sorted(k for k, n in Counter(before).items() if n > 1)
    if twice:
        problems.append(f"{len(twice)} shard(s) applied to the curriculum twice, e.g. {twice[0]}")
    unknown = sorted(set(before) - scored - quarantined)
    if unknown:
        problems.append(
            f"{len(unknown)} curriculum shard(s) are not committed scored shards, e.g. {unknown[0]}"
        )
    missing = sorted(scored - set(before) - quarantined)
    if finished and missing and not curriculum.newest_damaged:  # else: named with the file
        problems.append(
            f"{len(missing)} scored shard(s) never reached the curriculum, e.g. {missing[0]}"
        )
    facts["curriculum_versions"] = len(versions)
    return problems


def _capped(lines: list[str], what: str) -> list[str]:
    """At most MAX_LINES lines, then one that counts the rest."""
    if len(lines) <= MAX_LINES:
        return lines
    return [*lines[:MAX_LINES], f"and {len(lines) - MAX_LINES} more {what}"]


def _data_files(run: Run, stage: str) -> dict[str, dict[str, int]]:
    """key -> {data file name: size} of the data files under shards/{stage}/data/ (one
    listing with sizes; nothing is read)."""
    fs, base = run._loc.fs, f"{run._root}/shards/{stage}/data"
    try:
        infos = fs.ls(base, detail=True)
    except FileNotFoundError:
        return {}
    out: dict[str, dict[str, int]] = {}
    for info in infos:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        parts = name.rsplit(".", 2)  # {key}.{attempt}.parquet
        if info.get("type") == "file" and len(parts) == 3 and parts[2] == "parquet":
            out.setdefault(parts[0], {})[name] = int(info.get("size") or 0)
    return out


def _loss_problems(
    run: Run,
    step: int | None,
    versions: list[int],
    quarantined: dict[str, set[str]],
    remarks: list[str],
    facts: dict,
    content: bool = True,
) -> list[str]:
    """Everything the run's record says exists still does, at its recorded size: weight
    versions, the weights it needs, every checkpoint's files, every committed shard's data
    file, every evaluated version's eval shard. One line per missing thing. With `content`,
    the files whose size is right are hashed too (sha256 of the manifest or commit record;
    the CRC-32 of a shard committed before its record carried a sha256): one line per file
    whose content differs."""
    from runtime.retention import pruned_numbers
    from runtime.transports.publisher import LEDGER

    problems: list[str] = []
    pruned = pruned_numbers(run, "weights")
    ledger = run.read_metrics(LEDGER)
    not_stored = set()  # published by a transport beside the store, on purpose not durable
    if ledger.num_rows and "durable" in ledger.column_names:
        not_stored = {
            v
            for v, durable in zip(
                ledger.column("version").to_pylist(),
                ledger.column("durable").to_pylist(),
                strict=True,
            )
            if not durable
        }
    facts["weights_pruned"] = len(pruned)
    facts["weights_not_stored"] = len(not_stored - set(versions))
    top = max([*versions, step or 0]) if versions or step else None
    if top is not None:
        gone = sorted(set(range(top + 1)) - set(versions) - pruned - not_stored)
        problems += _capped(
            [
                f"weights v{v} is missing (weights/v{v}/_MANIFEST.json not found): the trainer "
                f"published versions 0..{top}, so weight versions are not continuous (neither "
                "retention, metrics pruned, nor the publish ledger, metrics weights with "
                "durable false, accounts for it). Fix: "
                f"restore weights/v{v}/ from a copy of the run"
                for v in gone
            ],
            "weight versions missing",
        )
    evals = run.read_metrics("eval")
    evaluated = (
        sorted({v for v in evals.column("version").to_pylist() if v is not None})
        if "version" in evals.column_names
        else []
    )
    needed: dict[int, list[str]] = {}
    if versions:
        needed.setdefault(versions[-1], []).append("the latest")
    for v in evaluated:
        if v in pruned:
            remarks.append(f"weights v{v} (evaluated) was deleted by retention (metrics pruned)")
            continue
        needed.setdefault(v, []).append("evaluated")
    hashed = {"files": 0, "bytes": 0}

    def add_content(kind: str, found: dict) -> dict:
        """found (number -> size damage) with the content damage of the size-intact ones."""
        intact = [n for n, d in found.items() if d == []]
        if not content or not intact:
            return found
        for n, (files, size, damage) in run.content_damage(kind, intact).items():
            hashed["files"] += files
            hashed["bytes"] += size
            found[n] = damage
        return found

    weights_damage = add_content("weights", run.weights_damage(sorted(needed)))
    for v, damage in sorted(weights_damage.items()):
        if damage is None and top is not None and v <= top:
            continue  # named above
        if damage is None:
            problems.append(
                f"weights v{v} ({', '.join(needed[v])}) is missing (weights/v{v}/_MANIFEST.json "
                f"not found): the eval metrics have a row for version {v}"
            )
        elif damage:
            problems.append(
                f"weights v{v} ({', '.join(needed[v])}) is damaged: {'; '.join(damage)} "
                f"(weights/v{v}/_MANIFEST.json). Fix: restore the file from a copy of the run"
            )

    steps = run.list_checkpoints()
    damaged = {
        s: d for s, d in add_content("checkpoint", run.checkpoint_damage(steps)).items() if d
    }
    for s, damage in sorted(damaged.items()):
        older = [o for o in steps if o < s and o not in damaged]
        problems.append(
            f"checkpoint step-{s} is damaged: {'; '.join(damage)} "
            f"(checkpoints/step-{s}/_MANIFEST.json). Fix: resume the run: the trainer "
            "quarantines it and resumes from "
            + (f"checkpoint step-{older[-1]}" if older else "the base model (none older is intact)")
        )
    for doc in run.list_quarantined_checkpoints():
        remarks.append(
            f"quarantined checkpoint {doc['entry']} by {doc.get('by') or '?'}: "
            f"{'; '.join(doc.get('damage') or []) or doc['reason'].split(' Fix:')[0]} "
            f"(copy: {doc['copy']})"
        )
    problems += run.checkpoint_quarantine_problems()
    facts["checkpoints_damaged"] = len(damaged)
    facts["checkpoints_quarantined"] = len(run.list_quarantined_checkpoints())

    shard_lines: list[str] = []
    by_crc = 0
    for stage in run.stages():
        files = _data_files(run, stage)
        hashes = run.shard_content_damage(stage) if content else {}
        for info in run.list_shards(stage):
            name = info.url.rsplit("/", 1)[-1]
            size = files.get(info.key, {}).get(name)
            where = f"shards/{stage}/data/{name}"
            if size is None:
                shard_lines.append(
                    f"{stage} shard {info.key} is missing its data file ({where} not found; "
                    f"its commit record says {info.bytes:,} bytes)"
                )
            elif size != info.bytes:
                shard_lines.append(
                    f"{stage} shard {info.key} is damaged: {where} is {size:,} bytes, its "
                    f"commit record says {info.bytes:,}"
                )
            elif info.key in hashes:
                check, damage = hashes[info.key]
                hashed["files"] += 1
                hashed["bytes"] += info.bytes
                by_crc += check == "crc32"
                if damage and damage != "missing":
                    shard_lines.append(
                        f"{stage} shard {info.key} is damaged: {where}: {damage} (same size, "
                        f"{info.bytes:,} bytes). Fix: restore the file from a copy of the run "
                        "(a stage that reads it quarantines it)"
                    )
    problems += _capped(shard_lines, "shard data files missing or damaged")
    if evaluated:
        from runtime.evaluation import set_shard_key
        from scalerl.config import HELDOUT_SET

        committed = {s.key for s in run.list_shards("eval")} | quarantined.get("eval", set())
        files = _data_files(run, "eval")
        # the eval metrics row of a version is computed from the fit set's shard
        try:
            fit = (run.read_config().get("evaluation") or {}).get("fit_set") or HELDOUT_SET
        except Exception:  # noqa: BLE001 - no readable run.json: checked elsewhere
            fit = HELDOUT_SET
        problems += _capped(
            [
                f"eval shard {key} is missing (shards/eval/commits/{key}.json not found"
                + ("; its data file is still there" if key in files else "")
                + f"): the eval metrics have a row for version {v}"
                for v in evaluated
                if (key := set_shard_key(fit, v)) not in committed
            ],
            "eval shards missing",
        )
    facts["shard_files_missing_or_damaged"] = len(shard_lines)
    facts["files_hashed"], facts["bytes_hashed"] = hashed["files"], hashed["bytes"]
    if not content:
        remarks.append(
            "--fast: sizes only; no file was hashed, so a file altered at the same size (bit "
            "rot) is not found. Run `scalerl runs verify` without --fast to check content"
        )
    elif by_crc:
        remarks.append(
            f"{by_crc} shard(s) were committed before commit records carried a sha256: their "
            "data files were checked against the record's CRC-32"
        )
    return problems
