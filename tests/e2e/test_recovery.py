"""Recovery: the flow process is SIGKILLed in the middle of a run; resuming it completes the run,
keeps every committed shard, trains nothing twice and publishes continuous weight versions."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.verify import verify_run
from storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
from scalerl.config import load_config
from flows.run import scalerl_run
if __name__ == "__main__":
    root, run_id = sys.argv[1], sys.argv[2]
    cfg = load_config(preset="tiny-cpu", overrides=[
        f"storage.url={root}", f"storage.run_id={run_id}", "schedule.max_steps=6",
        "trainer.checkpoint_every=2", "evaluation.every_steps=100", "data.num_eval_prompts=8"])
    scalerl_run(cfg)
"""


def _start(env, root, run_id):
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(root), run_id],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_sigkill_of_the_flow_process_then_resume(prefect_server, tmp_path):
    root, run_id = tmp_path / "runs", "recover-me"
    proc = _start(prefect_server, root, run_id)
    deadline = time.monotonic() + 300
    run = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed")
        try:
            run = open_store(str(root)).run(run_id)
            if (run.latest_checkpoint_step() or 0) >= 2 and (
                run.latest_weights_version() or 0
            ) >= 3:
                break
        except Exception:
            pass
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not reach step 3 in time")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {s.key: s.committed_at for s in run.list_shards("raw")}
    assert before

    resumed = _start(prefect_server, root, run_id)
    assert resumed.wait(timeout=600) == 0
    after = {s.key: s.committed_at for s in run.list_shards("raw")}
    assert {k: after.get(k) for k in before} == before  # nothing committed was lost or rewritten
    assert run.list_weight_versions() == list(range(7))
    assert run.read_status()["state"] == "finished"
    report = verify_run(run)
    assert report.ok, report.problems
    assert report.facts["checkpoint_step"] == 6
