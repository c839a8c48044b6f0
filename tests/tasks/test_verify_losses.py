"""`scalerl runs verify` names what is gone: a small finished run built through the store API
(5 weight versions, checkpoints at steps 2 and 4, raw/scored/filtered/eval shards, metrics,
curriculum) verifies clean, and each copy broken on purpose (a file deleted or truncated, a
manifest or commit record removed) gets one PROBLEM line naming what is missing."""

import datetime as dt
import json
import shutil

import pytest

from runtime.verify import verify_run
from storage import open_store, rollouts_from_records

RUN = "losses"
KEYS = ["gen0-000000", "gen0-000001"]
STEPS = 4  # weights v0..v4, checkpoints at 2 and 4
EVALUATED = [0, 2, 4]
WEIGHT_BYTES = 700


def _table(shard_id: str, n: int = 4):
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return rollouts_from_records(
        [
            {
                "run_id": RUN,
                "shard_id": shard_id,
                "prompt_id": f"p{i // 2}",
                "group_id": f"{shard_id}-g{i // 2}",
                "sample_index": i % 2,
                "task": "arith",
                "prompt": "1+1?",
                "prompt_token_ids": [1, 2],
                "answer": "2",
                "completion": "2",
                "completion_token_ids": [5, 6],
                "logprobs": [-0.1, -0.2],
                "versions": [0, 0],
                "finish_reason": "stop",
                "thinking_tokens": 1,
                "answer_tokens": 1,
                "generator_id": "gen0",
                "started_at": t0,
                "finished_at": t0,
            }
            for i in range(n)
        ]
    )


def _ledger() -> list[dict]:
    return [
        {
            "version": v,
            "outcome": "trained",
            "groups": {KEYS[v % 2]: [f"{KEYS[v % 2]}-g{v // 2}"]},
            "shards_read": [KEYS[v]] if v < len(KEYS) else [],
        }
        for v in range(STEPS)
    ]


def _build(root, tmp_path):
    run = open_store(str(root)).run(RUN, create=True)
    for stage in ("raw", "scored", "filtered"):
        for key in KEYS:
            run.commit_shard(stage, key, _table(key))
    for v in EVALUATED:
        run.commit_shard("eval", f"v{v:06d}", _table(f"eval-v{v:06d}"))
    run.save_curriculum({"sampler": {"retired": []}, "applied": KEYS[:1]}, 0)
    run.save_curriculum({"sampler": {"retired": []}, "applied": KEYS}, 1)
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"w" * WEIGHT_BYTES)
    for v in range(STEPS + 1):
        run.publish_weights(v, weights)
    ledger = _ledger()
    for step in (2, 4):
        ckpt = tmp_path / f"ckpt-{step}"
        ckpt.mkdir()
        (ckpt / "optimizer.pt").write_bytes(b"o" * 5000)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
        (ckpt / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ledger[:step]))
        run.save_checkpoint(step, ckpt)
    run.append_metrics("trainer", [{"step": s, "loss": 0.0} for s in range(1, STEPS + 1)])
    run.append_metrics("eval", [{"step": v, "version": v, "pass_rate": 0.5} for v in EVALUATED])
    run.write_status({"state": "finished"})
    return run


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pristine")
    _build(tmp / "runs", tmp)
    return tmp / "runs"


@pytest.fixture
def copy(pristine, tmp_path):
    """(run, its directory): a copy of the pristine run to break."""
    shutil.copytree(pristine, tmp_path / "runs")
    return open_store(str(tmp_path / "runs")).run(RUN), tmp_path / "runs" / RUN


def test_the_pristine_run_verifies_clean(copy):
    run, _ = copy
    report = verify_run(run)
    assert report.ok, report.problems
    assert report.facts["checkpoint_step"] == STEPS
    assert report.facts["checkpoints_damaged"] == 0


def test_the_final_weights_file_deleted(copy):
    run, base = copy
    (base / "weights" / f"v{STEPS}" / "model.safetensors").unlink()
    assert verify_run(run).problems == [
        f"weights v{STEPS} (the latest, evaluated) is damaged: model.safetensors is missing "
        f"(its manifest lists {WEIGHT_BYTES} bytes) (weights/v{STEPS}/_MANIFEST.json). Fix: "
        "restore the file from a copy of the run"
    ]


def test_an_evaluated_weights_file_truncated(copy):
    run, base = copy
    (base / "weights" / "v2" / "model.safetensors").write_bytes(b"w" * 100)
    assert verify_run(run).problems == [
        f"weights v2 (evaluated) is damaged: model.safetensors is 100 bytes, its manifest says "
        f"{WEIGHT_BYTES} (weights/v2/_MANIFEST.json). Fix: restore the file from a copy of the run"
    ]


def test_a_weights_version_missing_mid_run(copy):
    run, base = copy
    shutil.rmtree(base / "weights" / "v3")
    assert verify_run(run).problems == [
        f"weights v3 is missing (weights/v3/_MANIFEST.json not found): the trainer published "
        f"versions 0..{STEPS}, so weight versions are not continuous (neither retention, "
        "metrics pruned, nor the publish ledger, metrics weights with durable false, accounts "
        "for it). Fix: restore weights/v3/ from a copy of the run"
    ]


def test_versions_pruned_by_retention_or_never_stored_are_not_losses(copy):
    """Retention deletes v1 through the store API (recorded in metrics `pruned`); v3 was
    published beside the store (transport local: the ledger row says durable false) and its
    store copy is gone. Neither is a loss; v2 (evaluated, pruned too) is a remark, not a
    problem. A version the ledger says was stored and that is gone still is one."""
    from runtime.retention import PrunePlan, apply_plan

    run, base = copy
    assert apply_plan(run, PrunePlan(weights=[1, 2]), by="test") == 2 * WEIGHT_BYTES
    assert not (base / "weights" / "v1").exists()
    shutil.rmtree(base / "weights" / "v3")
    run.append_metrics("weights", [{"version": 3, "transport": "local", "durable": False}])
    report = verify_run(run)
    assert report.ok, report.problems
    assert report.facts["weights_pruned"] == 2 and report.facts["weights_not_stored"] == 1
    assert any("v2 (evaluated) was deleted by retention" in r for r in report.remarks)

    run.append_metrics("weights", [{"version": 3, "transport": "local", "durable": True}])
    assert [p.split(":")[0] for p in verify_run(run).problems] == [
        "weights v3 is missing (weights/v3/_MANIFEST.json not found)"
    ]


def test_scored_and_eval_data_files_deleted(copy):
    run, base = copy
    (scored,) = [s for s in run.list_shards("scored") if s.key == KEYS[1]]
    (evaluated,) = [s for s in run.list_shards("eval") if s.key == "v000002"]
    for info in (scored, evaluated):
        (base / "shards" / info.stage / "data" / info.url.rsplit("/", 1)[-1]).unlink()
    assert sorted(verify_run(run).problems) == sorted(
        f"{info.stage} shard {info.key} is missing its data file (shards/{info.stage}/data/"
        f"{info.url.rsplit('/', 1)[-1]} not found; its commit record says {info.bytes:,} bytes)"
        for info in (scored, evaluated)
    )


def test_a_truncated_filtered_data_file(copy):
    run, base = copy
    (info,) = [s for s in run.list_shards("filtered") if s.key == KEYS[0]]
    path = base / "shards" / "filtered" / "data" / info.url.rsplit("/", 1)[-1]
    path.write_bytes(path.read_bytes()[:1000])
    assert verify_run(run).problems == [
        f"filtered shard {KEYS[0]} is damaged: shards/filtered/data/{path.name} is 1,000 bytes, "
        f"its commit record says {info.bytes:,}"
    ]


def test_scored_and_eval_commit_records_deleted(copy):
    run, base = copy
    (base / "shards" / "scored" / "commits" / f"{KEYS[1]}.json").unlink()
    (base / "shards" / "eval" / "commits" / "v000004.json").unlink()
    problems = verify_run(run).problems
    expected = [
        f"raw shard {KEYS[1]} never reached scored: scored shard {KEYS[1]} is missing "
        f"(shards/scored/commits/{KEYS[1]}.json not found; its data file is still there)",
        "eval shard v000004 is missing (shards/eval/commits/v000004.json not found; its data "
        "file is still there): the eval metrics have a row for version 4",
    ]
    for line in expected:
        assert line in problems, problems


def test_a_deleted_checkpoint_file_is_a_problem_line_not_a_crash(copy):
    run, base = copy
    (base / "checkpoints" / "step-4" / "optimizer.pt").unlink()
    assert verify_run(run).problems == [
        "checkpoint step-4 is damaged: optimizer.pt is missing (its manifest lists 5,000 bytes) "
        "(checkpoints/step-4/_MANIFEST.json). Fix: resume the run: the trainer quarantines it "
        "and resumes from checkpoint step-2"
    ]


def test_a_deleted_checkpoint_ledger_falls_back_for_the_ledger(copy):
    run, base = copy
    (base / "checkpoints" / "step-4" / "ledger.jsonl").unlink()
    report = verify_run(run)  # no crash: the ledger of step-2 is read instead
    assert report.facts["checkpoint_step"] == 2
    size = len("".join(json.dumps(e) + "\n" for e in _ledger()).encode())
    assert report.problems[0] == (
        f"checkpoint step-4 is damaged: ledger.jsonl is missing (its manifest lists {size:,} "
        "bytes) (checkpoints/step-4/_MANIFEST.json). Fix: resume the run: the trainer "
        "quarantines it and resumes from checkpoint step-2"
    )


def test_a_quarantined_checkpoint_is_a_note(copy):
    run, base = copy
    intact = run.load_checkpoint(4, base.parent.parent / "intact")
    path = base / "checkpoints" / "step-4" / "optimizer.pt"
    path.write_bytes(path.read_bytes()[:1000])
    damage = run.checkpoint_damage([4])[4]
    assert damage == ["optimizer.pt is 1,000 bytes, its manifest says 5,000"]
    run.quarantine_checkpoint(4, "damaged", by="trainer", damage=damage)
    # a trainer resumed from step-2 trains 3..4 again and checkpoints step-4 anew
    run.save_checkpoint(4, intact)
    report = verify_run(run)
    assert not any("checkpoint" in p for p in report.problems), report.problems
    (note,) = [n for n in report.notes if n.startswith("quarantined checkpoint")]
    assert note.startswith(
        "quarantined checkpoint step-4 by trainer: optimizer.pt is 1,000 bytes, its manifest "
        f"says 5,000 (copy: {run.url}/quarantine/checkpoints/step-4/q-"
    )
    assert report.facts["checkpoints_quarantined"] == 1
