"""Chaos: a tiny run SIGKILLed again and again (seeded) in its generators, scorer, curriculum,
filter, trainer and flow loop, and once more from outside at a random moment, then resumed to the
end. The stored data alone must show the failure contract held (runtime/verify.py): every committed
shard kept and consumed at most once, trainer steps and weight versions continuous, curriculum
retirements never undone.

Each cycle starts the run (first) or resumes it (same run id) in a fresh process with
SCALERL_CHAOS="point:n" (scalerl/faults.py): the process SIGKILLs itself at the n-th hit of that
point, i.e. at that component's most delicate moment. The seed fixes which point and which hit;
SCALERL_CHAOS_SEED=<int> replays another plan.
"""

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from runtime.verify import verify_run
from scalerl.config import load_config
from scalerl.faults import POINTS
from storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("SCALERL_CHAOS_SEED", "20261125"))
# Room for every kill to fire: generators start a batch only when the trainer can still use
# it (tasks/rollouts.py), so a cycle near the end may have few shards left to reach a point.
MAX_STEPS = 64
SEAM_KILLS = 11  # every point once, the rest drawn at random
EXTERNAL_KILLS = 1  # os.kill from the test at a random moment, not at a seam
CYCLE_TIMEOUT_S = 120
# The n-th hit at which a point fires is drawn from 1..HITS[component]: small enough that every
# kill lands within seconds of the process getting going, large enough to vary the moment.
# Every point listed is reached on every shard or step (the curriculum commits a new version
# for every scored shard, retirements or not), so each drawn kill is guaranteed to fire.
HITS = {
    "generator": 4,
    "scorer": 3,
    "curriculum": 3,
    "filter": 3,
    "trainer": 3,
    "publisher": 3,
    "pruner": 2,
    "flow": 8,
}
OVERRIDES = [
    f"schedule.max_steps={MAX_STEPS}",
    "trainer.checkpoint_every=2",
    "generation.num_generators=2",
    "generation.prompts_per_batch=4",
    "generation.samples_per_prompt=8",
    "evaluation.every_steps=1000",
    "data.num_eval_prompts=8",
    "evaluation.samples_per_prompt=4",
]
SCRIPT = """
import sys
from scalerl.config import load_config
from flows.run import scalerl_run
if __name__ == "__main__":
    root, run_id = sys.argv[1], sys.argv[2]
    cfg = load_config(preset="tiny-cpu", overrides=[
        f"storage.url={root}", f"storage.run_id={run_id}", *sys.argv[3:]])
    scalerl_run(cfg)
"""


def kill_plan(rng: random.Random) -> list[tuple[str, int] | None]:
    """One (point, n) per seam kill, every point at least once; None = an external kill."""
    points = list(POINTS) + [rng.choice(POINTS) for _ in range(SEAM_KILLS - len(POINTS))]
    rng.shuffle(points)
    plan: list[tuple[str, int] | None] = [
        (p, rng.randint(1, HITS[p.split(".")[0]])) for p in points
    ]
    for _ in range(EXTERNAL_KILLS):
        plan.insert(rng.randint(1, len(plan)), None)  # never first: the run must exist
    return plan


def _start(env: dict, root: Path, run_id: str, log: Path, chaos: str | None):
    env = {k: v for k, v in env.items() if k != "SCALERL_CHAOS"}
    if chaos:
        env["SCALERL_CHAOS"] = chaos
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(root), run_id, *OVERRIDES],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _reap(proc: subprocess.Popen) -> None:
    """Kill what is left of the process group (reward workers exit on their own, a bit later)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _reap(proc)
        proc.wait()
        pytest.fail(f"run did not end within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def _progress(run) -> tuple[int, int]:
    """(raw shards, newest weights): both grow only while the pipeline really works."""
    try:
        return run.count_shards("raw"), run.latest_weights_version() or 0
    except Exception:
        return 0, 0


def _await_lease(run, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until process `proc` holds the run's lease (storage/lease.py)."""
    deadline = time.monotonic() + timeout
    while (run.lease_holder() or {}).get("pid") != proc.pid or (run.lease_holder() or {}).get(
        "released"
    ):
        assert proc.poll() is None and time.monotonic() < deadline, "it never took the lease"
        time.sleep(0.1)


def _committed(run) -> dict[tuple[str, str], float]:
    return {
        (stage, s.key): s.committed_at
        for stage in ("raw", "scored", "filtered")
        for s in run.list_shards(stage)
    }


@pytest.fixture(scope="module")
def chaos_run(prefect_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chaos")
    root, run_id = tmp / "runs", "chaos"
    rng = random.Random(SEED)
    plan = kill_plan(rng)
    run = None
    seen: dict[tuple[str, str], float] = {}
    cycles = []
    # The warm-started model is built once per machine and cached (runtime/common.py); on a fresh
    # machine building it takes longer than a cycle may, so build it before any cycle's clock.
    from runtime.common import materialize_base_model

    cfg = load_config(preset="tiny-cpu", overrides=[f"storage.url={root}", *OVERRIDES])
    materialize_base_model(cfg, tmp / "base-model")
    t0 = time.monotonic()
    for i, chaos in enumerate(plan):
        log = tmp / f"cycle-{i:02d}.log"
        spec = None if chaos is None else f"{chaos[0]}:{chaos[1]}"
        proc = _start(prefect_server, root, run_id, log, spec)
        started = time.monotonic()
        if chaos is None:  # external: a random moment after the pipeline visibly moved
            run = run or open_store(str(root)).run(run_id)
            before = _progress(run)
            while _progress(run) == before and proc.poll() is None:
                if time.monotonic() - started > CYCLE_TIMEOUT_S:
                    break
                time.sleep(0.2)
            time.sleep(rng.uniform(0.0, 3.0))
            _reap(proc)
        rc = _wait(proc, log, CYCLE_TIMEOUT_S)
        _reap(proc)
        if rc not in (0, -signal.SIGKILL):
            pytest.fail(f"cycle {i} ({spec}) exited with {rc}:\n{log.read_text()[-4000:]}")
        run = run or open_store(str(root)).run(run_id)
        now = _committed(run)
        changed = {k: (v, now.get(k)) for k, v in seen.items() if now.get(k) != v}
        assert not changed, f"cycle {i} ({spec}) lost or rewrote committed shards: {changed}"
        seen = now
        cycles.append(
            {
                "point": "external" if chaos is None else chaos[0],
                "n": None if chaos is None else chaos[1],
                "killed": rc == -signal.SIGKILL,
                "seconds": round(time.monotonic() - started, 1),
                "raw": sum(1 for stage, _ in now if stage == "raw"),
                "weights": run.latest_weights_version(),
                "checkpoint": run.latest_checkpoint_step(),
            }
        )
        print(cycles[-1])

    log = tmp / "final.log"
    proc = _start(prefect_server, root, run_id, log, None)
    started = time.monotonic()
    # A second resume of the same run while the first holds its lease: refused, one writer
    _await_lease(run, proc)
    twin_log = tmp / "final-twin.log"
    twin = _start(prefect_server, root, run_id, twin_log, None)
    twin_rc = _wait(twin, twin_log, 300)
    _reap(twin)
    assert twin_rc not in (0, -signal.SIGKILL), twin_log.read_text()[-4000:]
    assert f"is being written by pid {proc.pid}" in twin_log.read_text()
    rc = _wait(proc, log, 300)
    _reap(proc)
    assert rc == 0, log.read_text()[-4000:]
    final_s = time.monotonic() - started
    now = _committed(run)
    assert all(now.get(k) == v for k, v in seen.items()), "the final run rewrote committed shards"
    print(f"chaos: {len(plan)} cycles in {time.monotonic() - t0:.0f}s, final run {final_s:.0f}s")
    return {"root": root, "run_id": run_id, "run": run, "cycles": cycles}


def test_sigkills_everywhere_then_resume_keeps_the_failure_contract(chaos_run):
    cycles, run = chaos_run["cycles"], chaos_run["run"]
    killed = [c for c in cycles if c["killed"]]
    assert len(killed) >= 10, cycles
    components = {c["point"].split(".")[0] for c in killed}
    assert components >= {"generator", "scorer", "curriculum", "filter", "trainer", "flow"}
    assert any(c["point"] == "external" for c in killed)

    assert run.read_status()["state"] == "finished"
    # retention (weights.prune, default on) ran on the publisher thread through every kill:
    # the store keeps v0 and the k + 2 newest (v >= 64 - 8 - 1), plus what a killed
    # generator's lease still held (it expires READER_TTL_S after its last heartbeat); every
    # other version is recorded as pruned, none is simply gone
    from runtime.retention import pruned_numbers

    kept, pruned = set(run.list_weight_versions()), pruned_numbers(run, "weights")
    assert kept >= {0, *range(MAX_STEPS - 9, MAX_STEPS + 1)}, sorted(kept)
    assert kept | pruned == set(range(MAX_STEPS + 1))
    assert pruned, "nothing was pruned"
    assert len(run.list_checkpoints()) <= 3 + 1  # keep_checkpoints, + one a kill left behind
    report = verify_run(run)
    assert report.ok, report.problems
    assert report.facts["checkpoint_step"] == MAX_STEPS
    assert report.facts["raw_shards"] == report.facts["filtered_shards"] > 0

    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "scalerl"),
            "runs",
            "verify",
            chaos_run["run_id"],
            "--storage",
            str(chaos_run["root"]),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "ok"
    assert f"checkpoint_step: {MAX_STEPS}" in lines
    assert f"weight_versions: {len(kept)}" in lines and f"weights_pruned: {len(pruned)}" in lines


def _copy(chaos_run, tmp_path, name):
    """A copy of the chaos run to break on purpose (the original stays as it was)."""
    shutil.copytree(chaos_run["root"], tmp_path / name)
    return open_store(str(tmp_path / name)).run(chaos_run["run_id"])


def _rewrite_checkpoint(run, tmp_path, edit) -> None:
    """Load the newest checkpoint, let `edit(ledger, trainer_state)` change it, save it back."""
    step = run.latest_checkpoint_step()
    local = Path(run.load_checkpoint(step, tmp_path / f"ckpt-{time.monotonic_ns()}"))
    ledger = [json.loads(x) for x in (local / "ledger.jsonl").read_text().splitlines() if x]
    state = json.loads((local / "trainer_state.json").read_text())
    edit(ledger, state)
    (local / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ledger))
    (local / "trainer_state.json").write_text(json.dumps(state))
    run.save_checkpoint(step, local, overwrite=True)


def _first_trained(ledger):
    return next(e for e in ledger if e["outcome"] == "trained" and e["shards_read"])


def _dup_read(ledger, state):
    key = _first_trained(ledger)["shards_read"][0]
    ledger[-1]["shards_read"].append(key)
    state["assembler"]["shards_read"].append(key)


def _drop_group(ledger, state):
    entry = _first_trained(ledger)
    key = next(iter(entry["groups"]))
    entry["groups"][key] = entry["groups"][key][1:]


def _skip_shard(ledger, state):
    key = _first_trained(ledger)["shards_read"][0]
    for entry in ledger:
        entry["shards_read"] = [k for k in entry["shards_read"] if k != key]
        entry["groups"].pop(key, None)
    state["assembler"]["shards_read"].remove(key)


def _move_group(ledger, state):
    entry = _first_trained(ledger)
    key = next(iter(entry["groups"]))
    other = next(k for k in state["assembler"]["shards_read"] if k != key)
    entry["groups"][other] = [*entry["groups"].get(other, []), entry["groups"][key].pop()]


def _version_gap(ledger, state):
    _first_trained(ledger)["version"] += 1


def _train_twice(ledger, state):
    a, b = [e for e in ledger if e["outcome"] == "trained"][:2]
    key = next(iter(a["groups"]))
    b["groups"].setdefault(key, []).append(a["groups"][key][0])


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_dup_read, "read by the trainer more than once"),
        (_drop_group, "neither trained, dropped as stale nor pending"),
        (_skip_shard, "skipped by the trainer while later ones were read"),
        (_move_group, "not in the shard the ledger names"),
        (_version_gap, "trains version"),
        (_train_twice, "consumed by more than one step"),
    ],
)
def test_the_verifier_sees_a_broken_trainer_record(chaos_run, tmp_path, edit, problem):
    """The clean verdict above means something: each way of breaking the contract in the
    trainer's checkpoint is reported (the run's data otherwise unchanged)."""
    run = _copy(chaos_run, tmp_path, "broken")
    _rewrite_checkpoint(run, tmp_path, edit)
    report = verify_run(run)
    assert any(problem in p for p in report.problems), report.problems


def test_the_verifier_sees_lost_shards_gaps_and_undone_retirements(chaos_run, tmp_path):
    run = _copy(chaos_run, tmp_path, "lost")
    base = tmp_path / "lost" / chaos_run["run_id"]
    consumed = _first_trained(_checkpoint_ledger(run, tmp_path))["shards_read"][0]
    (base / "shards" / "filtered" / "commits" / f"{consumed}.json").unlink()
    problems = verify_run(run).problems
    assert any("no longer committed" in p for p in problems), problems
    assert any("never reached filtered" in p for p in problems), problems

    run = _copy(chaos_run, tmp_path, "versions")
    last = run.latest_weights_version()
    run.publish_weights(last + 1, run.download_weights(last, tmp_path / "w"))
    problems = verify_run(run).problems
    assert any(f"weights v{last + 1} exist" in p for p in problems), problems
    kept = run.list_weight_versions()[-3]  # one retention kept (the others are pruned)
    shutil.rmtree(tmp_path / "versions" / chaos_run["run_id"] / "weights" / f"v{kept}")
    assert any("weight versions are not continuous" in p for p in verify_run(run).problems)

    run = _copy(chaos_run, tmp_path, "metrics")
    parts = sorted((tmp_path / "metrics" / chaos_run["run_id"] / "metrics" / "trainer").iterdir())
    for part in parts:  # every row of step 3 (a replayed step may have two)
        if 3 in pq.read_table(part).column("step").to_pylist():
            part.unlink()
    problems = verify_run(run).problems
    assert any("without a metrics row, e.g. 3" in p for p in problems), problems

    run = _copy(chaos_run, tmp_path, "curriculum")
    version, state = run.load_curriculum()
    prompt = run.read_prompts("train").column("prompt_id")[0].as_py()
    retired = {**state["sampler"], "retired": [*state["sampler"]["retired"], prompt]}
    run.save_curriculum({"sampler": retired, "applied": [*state["applied"], "x-1"]}, version + 1)
    run.save_curriculum(
        {"sampler": state["sampler"], "applied": [*state["applied"], "x-1", "x-1"]}, version + 2
    )
    run.save_curriculum({"sampler": state["sampler"], "applied": state["applied"]}, version + 4)
    problems = verify_run(run).problems
    for expected in (
        f"curriculum v{version + 2} un-retired ['{prompt}']",
        "applied to the curriculum twice, e.g. x-1",
        "not committed scored shards, e.g. x-1",
        "curriculum versions are not continuous",
        f"curriculum v{version + 4} does not extend",
    ):
        assert any(expected in p for p in problems), (expected, problems)


def _checkpoint_ledger(run, tmp_path):
    local = Path(run.load_checkpoint(run.latest_checkpoint_step(), tmp_path / "ledger"))
    return [json.loads(x) for x in (local / "ledger.jsonl").read_text().splitlines() if x]
