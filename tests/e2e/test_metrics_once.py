"""A crash + resume counts every trained sample once: a tiny run whose trainer is SIGKILLed
after a checkpoint and some later steps, then resumed from that checkpoint (so those steps are
trained again and their metrics rows written twice), reads back one trainer row per step, a
staleness histogram that sums to the samples trained, and one eval row per version."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from runtime.evaluation import compute_at
from runtime.verify import verify_run
from scalerl.config import load_config
from scalerl.stats import eval_points, staleness_histogram
from storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS, CHECKPOINT_EVERY, KILL_AT = 6, 3, 6  # killed after publishing v6, before its row
P, G = 4, 8  # prompts per batch, samples per prompt
OVERRIDES = [
    f"schedule.max_steps={MAX_STEPS}",
    f"trainer.checkpoint_every={CHECKPOINT_EVERY}",
    f"generation.prompts_per_batch={P}",
    f"generation.samples_per_prompt={G}",
    "evaluation.every_steps=3",
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


def _run(env: dict, root: Path, run_id: str, log: Path, chaos: str | None) -> int:
    env = {k: v for k, v in env.items() if k != "SCALERL_CHAOS"}
    if chaos:
        env["SCALERL_CHAOS"] = chaos
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(root), run_id, *OVERRIDES],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        return proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end in time:\n{log.read_text()[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # generators, reward workers
            os.killpg(proc.pid, signal.SIGKILL)


def _ledger(run) -> list[dict]:
    step = run.latest_checkpoint_step()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(run.load_checkpoint(step, Path(tmp)))
        lines = (local / "ledger.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_steps_redone_after_a_crash_are_counted_once(prefect_server, tmp_path):
    root, run_id = tmp_path / "runs", "redo"
    config = load_config(preset="tiny-cpu", overrides=[f"storage.url={root}", *OVERRIDES])
    from runtime.common import materialize_base_model  # cached per machine; not on the clock

    materialize_base_model(config, tmp_path / "base-model")

    chaos = f"trainer.after_publish:{KILL_AT}"
    rc = _run(prefect_server, root, run_id, tmp_path / "crash.log", chaos)
    assert rc == -signal.SIGKILL, (tmp_path / "crash.log").read_text()[-4000:]
    run = open_store(str(root)).run(run_id)
    assert run.latest_checkpoint_step() == CHECKPOINT_EVERY
    before = run.read_metrics("trainer", all_rows=True).column("step").to_pylist()
    assert before == list(range(1, KILL_AT))  # 4 and 5 logged after the checkpoint at 3

    rc = _run(prefect_server, root, run_id, tmp_path / "resume.log", None)
    assert rc == 0, (tmp_path / "resume.log").read_text()[-4000:]
    assert run.read_status()["state"] == "finished"

    # written: 1..5, then 4..6 again by the resumed trainer; read: 1..6 once each
    redone = range(CHECKPOINT_EVERY + 1, KILL_AT)
    every = Counter(run.read_metrics("trainer", all_rows=True).column("step").to_pylist())
    assert every == Counter(
        {**dict.fromkeys(range(1, MAX_STEPS + 1), 1), **dict.fromkeys(redone, 2)}
    )
    trainer = run.read_metrics("trainer")
    assert trainer.column("step").to_pylist() == list(range(1, MAX_STEPS + 1))

    # every trained completion once: P whole groups of G per step, as the ledger says
    assert config.completions_per_batch == P * G
    ledger = [e for e in _ledger(run) if e["outcome"] == "trained"]
    assert len(ledger) == MAX_STEPS
    from_ledger = sum(len(set().union(*e["groups"].values())) * G for e in ledger)
    assert from_ledger == MAX_STEPS * P * G
    assert sum(staleness_histogram(trainer).values()) == MAX_STEPS * P * G == 192
    # (all rows would have counted the redone steps again: 8 x 32 = 256 samples)

    # the fit's points: one per evaluated version, at that version's compute
    evals = run.read_metrics("eval")
    versions = evals.column("version").to_pylist()
    assert versions == sorted(set(versions)) and 0 in versions
    compute, _, steps = eval_points(evals)
    assert steps == versions
    assert compute == [compute_at(config, v) for v in versions] == [v * P * G for v in versions]

    report = verify_run(run)
    assert report.ok, report.problems
    assert report.facts["trainer_steps_redone"] == len(redone)
    assert report.facts["trainer_rows_replaced"] == len(redone)
    assert any("trained again after a resume" in note for note in report.notes)
