"""A truncated checkpoint does not make a run unresumable: a tiny run with checkpoints at steps
2 and 4 is SIGKILLed after step 5, checkpoint step-4's optimizer.pt is cut to 1,000 bytes, and
the resumed run quarantines step-4 (copied aside with its reason), resumes from step-2 (steps
3..5 are trained again; metrics rows written twice are read once) and finishes; verify
is ok and notes the quarantined checkpoint."""

import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from runtime.verify import verify_run
from storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS, CHECKPOINT_EVERY, KILL_AT = 6, 2, 5  # checkpoints at 2 and 4, killed after v5
P, G = 4, 8  # prompts per batch, samples per prompt
OVERRIDES = [
    f"schedule.max_steps={MAX_STEPS}",
    f"trainer.checkpoint_every={CHECKPOINT_EVERY}",
    f"generation.prompts_per_batch={P}",
    f"generation.samples_per_prompt={G}",
    "evaluation.every_steps=100",
    "data.num_eval_prompts=8",
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


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(prefect_server, tmp_path):
    root, run_id = tmp_path / "runs", "ckpt-fallback"
    from runtime.common import materialize_base_model  # cached per machine; not on the clock
    from scalerl.config import load_config

    materialize_base_model(
        load_config(preset="tiny-cpu", overrides=[f"storage.url={root}", *OVERRIDES]),
        tmp_path / "base-model",
    )
    rc = _run(
        prefect_server, root, run_id, tmp_path / "crash.log", f"trainer.after_publish:{KILL_AT}"
    )
    assert rc == -signal.SIGKILL, (tmp_path / "crash.log").read_text()[-4000:]
    run = open_store(str(root)).run(run_id)
    assert run.list_checkpoints() == [2, 4]
    optimizer = root / run_id / "checkpoints" / "step-4" / "optimizer.pt"
    full = optimizer.stat().st_size
    assert full > 1000
    optimizer.write_bytes(optimizer.read_bytes()[:1000])

    rc = _run(prefect_server, root, run_id, tmp_path / "resume.log", None)
    log = (tmp_path / "resume.log").read_text()
    assert rc == 0, log[-4000:]
    assert run.read_status()["state"] == "finished"
    assert (
        f"checkpoint step-{4} of run {run_id} is damaged (optimizer.pt is 1,000 bytes, its "
        f"manifest says {full:,}): quarantined to {root / run_id}/quarantine/checkpoints/step-4/q-"
    ) in log
    assert "resuming from checkpoint step-2 instead: the steps after 2 are trained again" in log

    (doc,) = run.list_quarantined_checkpoints()
    assert doc["entry"] == "step-4" and doc["by"] == "trainer"
    assert doc["damage"] == [f"optimizer.pt is 1,000 bytes, its manifest says {full:,}"]
    assert "republished" not in doc["reason"] or "not republished" in doc["reason"]
    copy = root / run_id / doc["copy"].split(f"/{run_id}/", 1)[1] / "files" / "optimizer.pt"
    assert copy.stat().st_size == 1000  # kept as it was found

    # resumed from step-2: steps 3..5 trained again; killed after publishing v5 (before its
    # row), so the rows of 3 and 4 are written twice; 1..6 are read once each
    every = Counter(run.read_metrics("trainer", all_rows=True).column("step").to_pylist())
    assert every == Counter({1: 1, 2: 1, 3: 2, 4: 2, 5: 1, 6: 1})
    assert run.read_metrics("trainer").column("step").to_pylist() == list(range(1, MAX_STEPS + 1))
    assert run.list_checkpoints()[-1] == MAX_STEPS and 4 in run.list_checkpoints()
    assert run.list_weight_versions() == list(range(MAX_STEPS + 1))

    report = verify_run(run)
    assert report.ok, report.problems
    assert report.facts["checkpoints_quarantined"] == 1
    (note,) = [n for n in report.notes if n.startswith("quarantined checkpoint")]
    assert note.startswith(
        f"quarantined checkpoint step-4 by trainer: optimizer.pt is 1,000 bytes, its manifest "
        f"says {full:,} (copy: "
    )
