"""Evaluations of one published policy version on every evaluation set (paper: 1,000 held-out
prompts x 16 samples, every 100 steps), kept as datasets (`eval` shards) and as metrics rows.

The sets (eval_sets): 'heldout', the split carved from data.source (when
data.num_eval_prompts > 0), then each of evaluation.sets. One engine load per version samples
every set (generate_eval_shards); each set is its own shard of stage `eval`: key v{version:06d}
for the held-out set (as before sets existed), {name}-v{version:06d} for a named set; every row
carries `eval_set`. Metrics (evaluate_version):
- "eval_sets": one row per (version, set) with the set's mean@K / pass@K / maj@K
  (scalerl/eval_metrics.py), lengths and rates; keyed by `key` = {set}-v{version:06d}.
- "eval": one row per version in the format it had before sets, from evaluation.fit_set: the
  sigmoid fit, the curve, compare and verify read it.

Idempotent: a committed shard is not sampled again; a retry only writes the metrics rows that
are missing, from the shards.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.common import WeightCache, open_run
from runtime.generation import engine_kind
from runtime.isolated import in_process, run_isolated
from runtime.transports import ReaderLease
from scalerl.config import HELDOUT_SET, RunConfig
from scalerl.prompts import eval_split

EVAL = "eval"
EVAL_SETS = "eval_sets"  # metrics stream: one row per (version, set)
EVAL_SET_COLUMN = "eval_set"  # the column of eval rows naming their set
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
    """Shard key of the held-out set's evaluation of `version` (as before sets existed)."""
    return f"v{version:06d}"


def set_shard_key(name: str, version: int) -> str:
    """Shard key (stage eval) of set `name` at `version`: v{version:06d} for the held-out set,
    {name}-v{version:06d} for a set of evaluation.sets (set names are [a-z0-9_.-], at most 64
    characters, so the key is a valid shard key)."""
    return eval_key(version) if name == HELDOUT_SET else f"{name}-{eval_key(version)}"


@dataclass(frozen=True)
class EvalSet:
    """One evaluated set: its name, prompt split, samples per prompt and reported metrics."""

    name: str
    samples_per_prompt: int
    metric_ks: tuple[tuple[str, int], ...]

    @property
    def split(self) -> str:
        return eval_split(self.name)

    def shard_key(self, version: int) -> str:
        return set_shard_key(self.name, version)


def eval_sets(config: RunConfig) -> list[EvalSet]:
    """The sets evaluated at every version: 'heldout' first (when data.num_eval_prompts > 0),
    then evaluation.sets in order."""
    ev = config.evaluation
    named = {s.name: s for s in ev.sets}
    out = []
    for name in ev.set_names(config.data.num_eval_prompts):
        if name == HELDOUT_SET:
            out.append(EvalSet(name, ev.samples_per_prompt, tuple(ev.heldout_metric_ks())))
        else:
            s = named[name]
            out.append(EvalSet(name, s.samples_per_prompt, tuple(s.metric_ks())))
    return out


def missing_sets(run, sets: list[EvalSet], version: int) -> list[EvalSet]:
    """The sets whose eval shard of `version` is not committed yet."""
    return [s for s in sets if not run.has_shard(EVAL, s.shard_key(version))]


def generate_eval_shards(config: RunConfig, run_id: str, version: int) -> None:
    """Sample and score every evaluation set's prompts with policy `version`, loading the engine
    once, and commit one eval shard per set (set_shard_key) whose rows carry `eval_set`. A set
    whose shard is committed is skipped. Runs in a child process (evaluate_version), or here
    with pipeline.isolation = thread."""
    from runtime.generation import length_policy, sampling_settings, shared_engine

    run = open_run(config, run_id)
    todo = missing_sets(run, eval_sets(config), version)
    if not todo:
        return
    prompts = {s.name: _set_prompts(run, s) for s in todo}  # before the engine: fail fast
    lease = ReaderLease(run, f"eval-{eval_key(version)}")  # retention keeps it while it loads
    lease.hold(version)
    try:
        with tempfile.TemporaryDirectory(prefix="scalerl-eval-w-") as local:
            # The engine copies the weights into its live parameters; the local copy can go.
            engine = shared_engine(config, WeightCache(run, Path(local), config), version)
    finally:
        lease.release()
    sampling = sampling_settings(config, temperature=config.evaluation.temperature, seed=version)
    length = length_policy(config, engine.tokenizer)
    for s in todo:
        table = _sample_set(engine, s, prompts[s.name], sampling, length, run_id, version)
        run.commit_shard(EVAL, s.shard_key(version), table)


def _set_prompts(run, s: EvalSet) -> dict[str, dict]:
    """prompt_id -> prompt row of set `s` (prompts/{split}.parquet, rendered by prepare)."""
    from storage.errors import NotCommittedError

    try:
        table = run.read_prompts(s.split)
    except NotCommittedError:
        raise NotCommittedError(
            f"evaluation set {s.name!r} has no prompts in run {run.run_id} "
            f"(prompts/{s.split}.parquet not found): the run was prepared without it. Fix: "
            "start a run with the set in evaluation.sets, or remove it from the config."
        ) from None
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    if not rows:
        raise ValueError(
            f"evaluation set {s.name!r} has no prompts (prompts/{s.split}.parquet is empty). "
            "Fix: give the set a source with prompts, or remove it from evaluation.sets."
        )
    return rows


def _sample_set(engine, s: EvalSet, rows: dict[str, dict], sampling, length, run_id, version):
    """The scored rollout table of set `s`: samples_per_prompt completions of each prompt, sent
    as the rendered text, scored by the run's verifiers, with an `eval_set` column."""
    import pyarrow as pa

    from runtime.generation import completion_records
    from scalerl.engines.base import GroupRequest
    from scalerl.rewards import score_many
    from storage import rollouts_from_records

    shard_id = f"eval-{s.shard_key(version)}"
    requests = [GroupRequest(pid, row["prompt"], s.samples_per_prompt) for pid, row in rows.items()]
    groups = list(engine.generate(requests, sampling, length=length))
    records = completion_records(
        groups, rows, run_id=run_id, shard_id=shard_id, generator_id="eval", version=version
    )
    rewards = score_many(records, [r["completion"] for r in records])
    for record, reward in zip(records, rewards, strict=True):
        record.update(reward=reward.value, passed=reward.passed, reward_reason=reward.reason)
    table = rollouts_from_records(records)
    return table.append_column(EVAL_SET_COLUMN, pa.array([s.name] * table.num_rows, pa.string()))


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
    """generate_eval_shards in a child process (`python -m runtime.eval_child`): vLLM allows
    one engine per process and the generator's lives in this one. The child gets the config on stdin (it holds
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
    """Evaluate weights `version` on every set (their eval shards, unless committed), append a
    metrics row per set to "eval_sets" and the fit set's row to "eval" (one row per version,
    today's format); returns the "eval" row with "sets": {name: its eval_sets row}. What
    tasks.evaluate.evaluate_policy runs."""
    run = open_run(config, run_id)
    sets = eval_sets(config)
    if missing_sets(run, sets, version):
        if engine_kind(config).one_per_process:  # vllm, vllm-async
            generate_eval_shard_in_child(config, run_id, version)
        elif not in_process(config):
            # a fork of the fork server (torch and transformers already imported): the flow
            # process never imports them, and sampling does not hold the flow's GIL while its
            # loop moves shards to the trainer
            run_isolated(
                "runtime.evaluation:generate_eval_shards",
                config,
                f"evaluation eval-v{version}",
                nice=config.evaluation.nice,  # off the training path: yields CPU to it
                timeout_s=EVAL_TIMEOUT_S,
                run_id=run_id,
                version=version,
            )
        else:
            generate_eval_shards(config, run_id, version)
    tables = {s.name: run.read_shard(EVAL, s.shard_key(version)) for s in sets}
    base = {
        "step": version,
        "version": version,
        "compute": compute_at(config, version),
        "time": time.time(),  # when it was measured (the trackers' clock for this row)
    }
    set_rows = {s.name: set_row(s, tables[s.name], base) for s in sets}
    _append_new(run, EVAL_SETS, list(set_rows.values()), "key")
    # the "eval" row last: it marks the version as evaluated (retention, the flow's resume)
    row = {**base, **summary(tables[config.evaluation.fit_set])}
    _append_new(run, EVAL, [row], "version")  # a resumed flow re-evaluates v0: one per version
    return {**row, "sets": set_rows}


def summary(table) -> dict:
    """The "eval" row's measurements of one scored eval shard (today's columns)."""
    import pyarrow.compute as pc

    passed = table.column("passed").to_numpy(zero_copy_only=False).astype(float)
    lengths = pc.list_value_length(table.column("completion_token_ids")).to_numpy(
        zero_copy_only=False
    )
    reasons = table.column("finish_reason").to_pylist()
    prompt_ids = table.column("prompt_id").to_pylist()
    return {
        "pass_rate": float(passed.mean()),
        "pass_rate_se": sampling_se(prompt_ids, passed),
        "prompts": len(set(prompt_ids)),
        "samples": table.num_rows,
        "mean_length": float(lengths.mean()),
        "truncation_rate": reasons.count("length") / len(reasons),
        "interruption_rate": reasons.count("interrupted") / len(reasons),
    }


def set_row(s: EvalSet, table, base: dict) -> dict:
    """The "eval_sets" row of set `s`: key, set, step/version/compute, prompts, samples,
    samples_per_prompt, one column per metric (e.g. "mean@16", "pass@1", "maj@16"), mean_length,
    truncation_rate, interruption_rate."""
    from scalerl.eval_metrics import set_metrics

    columns = ["prompt_id", "sample_index", "passed", "completion", "task"]
    metrics = set_metrics(table.select(columns).to_pylist(), s.metric_ks)
    whole = summary(table)
    return {
        "key": f"{s.name}-{eval_key(base['version'])}",
        "set": s.name,
        **base,
        "prompts": whole["prompts"],
        "samples": whole["samples"],
        "samples_per_prompt": s.samples_per_prompt,
        **metrics,
        "mean_length": whole["mean_length"],
        "truncation_rate": whole["truncation_rate"],
        "interruption_rate": whole["interruption_rate"],
    }


def _append_new(run, stream: str, rows: list[dict], key: str) -> None:
    """Append the rows whose `key` value the stream does not hold yet (a retried evaluation
    adds nothing; read_metrics keeps one row per key should two writers race)."""
    done = run.read_metrics(stream)
    seen = set(done.column(key).to_pylist()) if key in done.column_names else set()
    new = [r for r in rows if r[key] not in seen]
    if new:
        run.append_metrics(stream, new)
