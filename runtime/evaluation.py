"""Evaluations: held-out pass rate of one published policy version (paper: 1,000 prompts x 16
samples, every 100 steps), kept as a dataset (`eval` shards) and as a metrics row.

Idempotent: the eval shard's key is the version; a retry finds it committed and only rewrites
the metrics row from it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from runtime.common import WeightCache, open_run
from runtime.generation import engine_kind
from runtime.isolated import in_process, run_isolated
from runtime.transports import ReaderLease
from scalerl.config import RunConfig

EVAL = "eval"
# an evaluation process still running after this is taken as hung: it is killed and the task
# retried (the same 2 h as the Prefect task timeout this replaces)
EVAL_TIMEOUT_S = 7200.0


def compute_at(config: RunConfig, step: int) -> float:
    """Compute spent by trainer step `step` on the configured axis (samples: nominal batches)."""
    unit = config.schedule.compute_unit
    if unit == "steps":
        return float(step)
    return float(step * config.completions_per_batch)


def sampling_se(prompt_ids: list[str], passed) -> float | None:
    """Standard error of the pass rate from sampling alone, for this fixed held-out set: the
    mean over n prompts of per-prompt means of s_i samples has variance
    sum_i p_i (1 - p_i) / s_i / n^2, with p_i (1 - p_i) / s_i estimated without bias by
    q_i (1 - q_i) / (s_i - 1) from the observed share q_i (0 for a prompt with one sample).
    With the same s for every prompt (as evaluations make them) that mean is the pass rate.
    None when no prompt has two samples: nothing to estimate it from."""
    import numpy as np

    ids, inverse = np.unique(np.asarray(prompt_ids, dtype=object), return_inverse=True)
    s = np.bincount(inverse).astype(float)
    if not (s > 1).any():
        return None
    q = np.bincount(inverse, weights=np.asarray(passed, dtype=float)) / s
    var = np.where(s > 1, q * (1 - q) / np.maximum(s - 1, 1), 0.0)
    return float(np.sqrt(var.sum()) / len(ids))


def eval_key(version: int) -> str:
    return f"v{version:06d}"


def generate_eval_shard(config: RunConfig, run_id: str, version: int) -> None:
    """Sample and score the held-out prompts with policy `version`; commit eval/v{version}.
    Runs in a child process (evaluate_policy), or here with pipeline.isolation = thread."""
    from runtime.generation import (
        completion_records,
        length_policy,
        sampling_settings,
        shared_engine,
    )
    from scalerl.engines.base import GroupRequest
    from scalerl.rewards import score_many
    from storage import rollouts_from_records

    run = open_run(config, run_id)
    key = eval_key(version)
    if run.has_shard(EVAL, key):
        return
    rows = {r["prompt_id"]: r for r in run.read_prompts("eval").to_pylist()}
    lease = ReaderLease(run, f"eval-{key}")  # retention keeps the version while it loads
    lease.hold(version)
    try:
        with tempfile.TemporaryDirectory(prefix="scalerl-eval-w-") as local:
            # The engine copies the weights into its live parameters; the local copy can go.
            engine = shared_engine(config, WeightCache(run, Path(local), config), version)
    finally:
        lease.release()
    requests = [
        GroupRequest(pid, row["prompt"], config.evaluation.samples_per_prompt)
        for pid, row in rows.items()
    ]
    sampling = sampling_settings(config, temperature=config.evaluation.temperature, seed=version)
    groups = list(
        engine.generate(requests, sampling, length=length_policy(config, engine.tokenizer))
    )
    records = completion_records(
        groups, rows, run_id=run_id, shard_id=f"eval-{key}", generator_id="eval", version=version
    )
    rewards = score_many(records, [r["completion"] for r in records])
    for record, reward in zip(records, rewards, strict=True):
        record.update(reward=reward.value, passed=reward.passed, reward_reason=reward.reason)
    run.commit_shard(EVAL, key, rollouts_from_records(records))


def kill_tree(proc) -> None:
    """Kill a child process and every process under it, then reap it. vLLM runs its engine
    core in processes of its own, which can outlive their parent (and keep its GPU memory)
    if only the child were killed. psutil comes with vLLM."""
    import contextlib

    import psutil

    family = []
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(proc.pid)
        family = [*root.children(recursive=True), root]  # collected before any dies
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    proc.communicate()


def generate_eval_shard_in_child(config: RunConfig, run_id: str, version: int) -> None:
    """The same, in a child process (`python -m runtime.eval_child`): vLLM allows one engine per
    process and the generator's lives in this one. The child gets the config on stdin (it holds
    no credentials; those stay in the inherited environment) and its own engine, sized by
    evaluation.gpu_memory_utilization; the engine's memory goes back when the child exits."""
    import os
    import subprocess
    import sys

    from runtime.common import process_env

    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.eval_child", run_id, str(version)],
        env={**os.environ, **process_env(config, "eval")},  # its planned devices
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = proc.communicate(config.model_dump_json(), timeout=EVAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise TimeoutError(
            f"the evaluation process for v{version} did not finish within {EVAL_TIMEOUT_S:g} s "
            "and was killed with its engine processes. Fix: check the engine's memory and "
            "evaluation settings; the task is retried."
        ) from None
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise RuntimeError(
            f"the evaluation process for v{version} exited with code {proc.returncode}:\n{tail}"
        )


def evaluate_version(config: RunConfig, run_id: str, version: int) -> dict:
    """Evaluate weights `version` (its eval shard, unless committed) and append its metrics row
    (one per version); returns the row. What tasks.evaluate.evaluate_policy runs."""
    import pyarrow.compute as pc

    run = open_run(config, run_id)
    key = eval_key(version)
    if not run.has_shard(EVAL, key):
        if engine_kind(config).one_per_process:  # vllm, vllm-async
            generate_eval_shard_in_child(config, run_id, version)
        elif not in_process(config):
            # a fork of the fork server (torch and transformers already imported): the flow
            # process never imports them, and sampling does not hold the flow's GIL while its
            # loop moves shards to the trainer
            run_isolated(
                "runtime.evaluation:generate_eval_shard",
                config,
                f"evaluation eval-v{version}",
                nice=config.evaluation.nice,  # off the training path: yields CPU to it
                timeout_s=EVAL_TIMEOUT_S,
                run_id=run_id,
                version=version,
            )
        else:
            generate_eval_shard(config, run_id, version)
    table = run.read_shard(EVAL, key)
    passed = table.column("passed").to_numpy(zero_copy_only=False).astype(float)
    lengths = pc.list_value_length(table.column("completion_token_ids")).to_numpy(
        zero_copy_only=False
    )
    reasons = table.column("finish_reason").to_pylist()
    row = {
        "step": version,
        "version": version,
        "compute": compute_at(config, version),
        "pass_rate": float(passed.mean()),
        "pass_rate_se": sampling_se(table.column("prompt_id").to_pylist(), passed),
        "prompts": len(set(table.column("prompt_id").to_pylist())),
        "samples": table.num_rows,
        "mean_length": float(lengths.mean()),
        "truncation_rate": reasons.count("length") / len(reasons),
        "interruption_rate": reasons.count("interrupted") / len(reasons),
    }
    done = run.read_metrics(EVAL)
    if done.num_rows == 0 or version not in done.column("version").to_pylist():
        run.append_metrics(EVAL, [row])  # a resumed flow re-evaluates v0: one row per version
    return row
