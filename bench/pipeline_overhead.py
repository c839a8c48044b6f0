"""Orchestration overhead of the whole pipeline on the tiny-cpu preset, and k = 8 beside k = 0.

    .venv/bin/python bench/pipeline_overhead.py [--steps 12]

For each run: wall time of the flow; the union of the intervals in which real compute ran
(generation batches from the raw shards' own timestamps, evaluation and scoring task runs from
the Prefect API, trainer steps from the trainer metrics); overhead share = 1 - busy / wall
(orchestration, storage, waiting); the trainer's idle share = time it waited for data / its
task's lifetime; samples trained per second. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time

import pyarrow.compute as pc


def _union(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    total, end = 0.0, lo
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


async def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs, page = [], 200  # the API serves at most 200 per request
    async with get_client() as client:
        while True:
            batch = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                limit=page,
                offset=len(runs),
            )
            runs += batch
            if len(batch) < page:
                return runs


def one_run(k: int, steps: int, root: str) -> dict:
    from flows.run import scalerl_run
    from scalerl.config import load_config
    from storage import open_store

    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={root}",
            f"pipeline.max_off_policy_steps={k}",
            f"schedule.max_steps={steps}",
            f"evaluation.every_steps={steps}",
            "data.num_eval_prompts=16",
        ],
    )
    started = time.time()
    state = scalerl_run(cfg, return_state=True)
    ended = time.time()
    summary = state.result()
    run = open_store(root).run(summary["run_id"])
    busy: list[tuple[float, float]] = []
    for info in run.list_shards("raw"):
        t = run.read_shard("raw", info.key)
        busy.append(
            (
                pc.min(t["started_at"]).as_py().timestamp(),
                pc.max(t["finished_at"]).as_py().timestamp(),
            )
        )
    metrics = run.read_metrics("trainer").to_pylist()
    busy += [(m["time"] - m["step_time_s"], m["time"]) for m in metrics]
    trainer_life = 0.0
    for tr in asyncio.run(_task_runs(state.state_details.flow_run_id)):
        if tr.start_time is None or tr.end_time is None:
            continue
        span = (tr.start_time.timestamp(), tr.end_time.timestamp())
        if tr.name.startswith(("score-shard", "evaluate-policy")):
            busy.append(span)
        if tr.name.startswith("train-policy"):
            trainer_life = span[1] - span[0]
    wall = ended - started
    compute = _union(busy, started, ended)
    samples = sum(m["samples_kept"] for m in metrics)
    return {
        "k": k,
        "steps": summary["step"],
        "wall_s": round(wall, 2),
        "busy_s": round(compute, 2),
        "overhead_share": round(1 - compute / wall, 4),
        "trainer_idle_share": round(sum(m["wait_s"] for m in metrics) / trainer_life, 4)
        if trainer_life
        else None,
        "samples_trained": samples,
        "samples_trained_per_s": round(samples / wall, 2),
        "raw_shards": run.count_shards("raw"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    from prefect import flow

    flow(name="warm-up")(lambda: None)()  # start the temporary Prefect server outside the timings
    with tempfile.TemporaryDirectory(prefix="scalerl-bench-") as root:
        runs = [one_run(8, args.steps, root), one_run(0, args.steps, root)]
    k8, k0 = runs
    print(
        json.dumps(
            {
                "bench": "pipeline_overhead",
                "preset": "tiny-cpu",
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "runs": runs,
                "samples_per_s_ratio_k8_over_k0": round(
                    k8["samples_trained_per_s"] / k0["samples_trained_per_s"], 3
                )
                if k0["samples_trained_per_s"]
                else None,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
