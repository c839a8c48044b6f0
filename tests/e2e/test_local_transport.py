"""Weight transport `local` through a whole tiny-cpu run, with retention on, then
`scalerl runs prune` on the finished run (runtime/transports/local.py, runtime/retention.py).

k = 2 and 8 steps, so retention has something to delete while the run goes; versions reach
the generators through the node-local directory, and the store receives only version 0, the
durable_every-th, the evaluation versions and the checkpoint versions. The stored data alone
must still verify clean, and every version 0..8 must be accounted for: stored, in the ledger
as not durable, or recorded as pruned.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.retention import pruned_numbers
from runtime.verify import verify_run
from storage import open_store
from tests.e2e.conftest import REPO, start_run, wait_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

STEPS, K, EVERY, DURABLE, CKPT = 8, 2, 4, 3, 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "scalerl"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_local_transport_run_verifies_and_prunes(prefect_server, tmp_path):
    root, shm, run_id = tmp_path / "runs", tmp_path / "shm", "local-w"
    log = tmp_path / "run.log"
    proc = start_run(
        prefect_server,
        [
            f"storage.url={root}",
            f"storage.run_id={run_id}",
            f"schedule.max_steps={STEPS}",
            "weights.transport=local",
            f"weights.local_dir={shm}",
            f"weights.durable_every={DURABLE}",
            "weights.keep_checkpoints=2",
            f"pipeline.max_off_policy_steps={K}",
            f"trainer.checkpoint_every={CKPT}",
            f"evaluation.every_steps={EVERY}",
            "data.num_eval_prompts=8",
            "evaluation.samples_per_prompt=4",
            "generation.prompts_per_batch=4",
            "generation.samples_per_prompt=8",
        ],
        log,
    )
    assert wait_run(proc, log, timeout=600) == 0, log.read_text()[-4000:]
    run = open_store(str(root)).run(run_id)
    assert run.read_status()["state"] == "finished"

    ledger = run.read_metrics("weights").to_pylist()
    assert [r["version"] for r in ledger] == list(range(STEPS + 1))
    assert {r["transport"] for r in ledger} == {"local"}
    durable = {r["version"] for r in ledger if r["durable"]}
    # v0, multiples of durable_every and of evaluation.every_steps, and checkpoint versions
    assert durable >= {0, 3, 4, 6, 8} and durable <= {0, 2, 3, 4, 6, 8}
    stored, pruned = set(run.list_weight_versions()), pruned_numbers(run, "weights")
    assert stored <= durable and stored | pruned == durable
    assert {0, 4, 8} <= stored  # the base, the evaluated versions (kept) and the final one
    assert not shm.joinpath(run_id).exists()  # the node-local copies go with the run
    assert len(run.list_checkpoints()) == 2 and run.list_checkpoints()[-1] == STEPS
    evals = run.read_metrics("eval").column("version").to_pylist()
    assert sorted(evals) == [0, 4, 8]
    report = verify_run(run)
    assert report.ok, report.problems
    assert report.facts["weights_not_stored"] == STEPS + 1 - len(durable)

    # the finished run: a dry run deletes nothing, --apply keeps v0, the evaluated versions
    # and the final one, and the newest checkpoint
    dry = _cli("runs", "prune", run_id, "--storage", str(root), "--keep-checkpoints", "1")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "dry run: nothing deleted" in dry.stdout and "bytes freed:" in dry.stdout
    assert set(run.list_weight_versions()) == stored
    done = _cli(
        "runs", "prune", run_id, "--storage", str(root), "--keep-checkpoints", "1", "--apply"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bytes freed" in done.stdout
    assert run.list_weight_versions() == [0, 4, 8]
    assert run.list_checkpoints() == [STEPS]
    report = verify_run(run)
    assert report.ok, report.problems
