"""Generators on separate workers: trained samples/s with 1 vs 2 generator flow runs, and the
orchestration cost of starting a generator as a flow run, against a generator started by the
run flow on its own machine. Side by side in one run of this script.

    .venv/bin/python bench/work_pools.py [--steps 30] [--out bench/results/work_pools.json]

Set-up as tests/e2e/test_work_pools.py: a real `prefect server`, the S3-protocol server
(moto_server), process workers each in a directory of its own (HOME, TMPDIR, SCALERL_CACHE),
each with `--limit 1` so that each generator flow run lands on its own worker; the run flow in
this script's process tree. Three tiny-cpu runs of --steps steps: `local` (1 generator, a
process of the flow's machine, as by default), `pool-1` (1 generator flow run on worker A),
`pool-2` (2 generator flow runs, on workers A and B). Reported per run:
- trained samples/s between the trainer's first and last step (trainer metrics timestamps);
- per generator: flow run created -> started by its worker (the worker's pickup), started ->
  registered in the run (process start, imports, config from the store, engine build), and for
  the local run the task's start -> registered; the orchestration overhead of a flow run is
  the remote created -> registered minus the local start -> registered.
This machine has 2 cores shared by everything: two generators compete with the trainer for
them, so 2 may not be faster than 1 here. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
S3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _prefect(env, *args) -> None:
    subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=300)  # fmt: skip


async def _flow_runs(run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async with get_client() as client:
        return await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"run:{run_id}"]))
        )


def one_run(name: str, env: dict, url: str, endpoint: str, steps: int, extra: list[str]) -> dict:
    from storage import open_store

    run_id = f"bench-{name}"
    script = (
        "import sys\nfrom scalerl.config import load_config\nfrom flows.run import scalerl_run\n"
        "if __name__ == '__main__':\n"
        "    scalerl_run(load_config(preset='tiny-cpu', overrides=sys.argv[1:]))\n"
    )
    registered: dict[str, float] = {}
    store = open_store(
        url, storage_options={**{"key": "testing", "secret": "testing"},
                              "client_kwargs": {"endpoint_url": endpoint}},
    )  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", script, f"storage.url={url}", f"storage.endpoint_url={endpoint}",
         f"storage.run_id={run_id}", f"schedule.max_steps={steps}", "evaluation.every_steps=1000",
         "data.num_eval_prompts=8", *extra],
        env={**env, **S3}, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    run = None
    try:
        while proc.poll() is None:  # the generators' registrations, as they appear
            with contextlib.suppress(Exception):
                run = run or store.run(run_id)
                for gid, doc in run.read_markers("generator-").items():
                    registered.setdefault(gid[len("generator-") :], doc["started"])
            time.sleep(0.2)
        if proc.returncode != 0:
            raise SystemExit(f"run {name} failed with exit code {proc.returncode}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    wall = time.time() - t0
    run = store.run(run_id)
    trainer = run.read_metrics("trainer").to_pylist()
    first, last = trainer[0]["time"], trainer[-1]["time"]
    samples = sum(r["samples_in_batch"] for r in trainer[1:])  # trained after the first step
    out = {
        "wall_s": round(wall, 1),
        "trained_samples_per_s": round(samples / (last - first), 1),
        "steps": len(trainer),
        "generators": {},
    }
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        runs = asyncio.run(_flow_runs(run_id))
    by_name = {r.name: r for r in runs}
    parent = by_name.get(f"scalerl-run/{run_id}")
    for gid, started in sorted(registered.items()):
        child = by_name.get(f"{run_id}/{gid}")
        if child is not None and child.start_time is not None:
            pickup = child.start_time.timestamp() - child.created.timestamp()
            out["generators"][gid] = {
                "created_to_started_s": round(pickup, 2),
                "started_to_registered_s": round(started - child.start_time.timestamp(), 2),
                "created_to_registered_s": round(started - child.created.timestamp(), 2),
            }
        elif parent is not None and parent.start_time is not None:
            out["generators"][gid] = {
                "flow_started_to_registered_s": round(started - parent.start_time.timestamp(), 2)
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="sb-") as tmp:
        tmp = Path(tmp)
        port, s3_port = _port(), _port()
        env = {
            **os.environ,
            "PREFECT_HOME": str(tmp / "prefect"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        procs = [
            subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                              "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True),
            subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True),
        ]  # fmt: skip
        try:
            endpoint = f"http://127.0.0.1:{s3_port}"
            _wait_http(f"http://127.0.0.1:{port}/api/health")
            _wait_http(endpoint)
            import s3fs

            s3fs.S3FileSystem(key="testing", secret="testing",
                              client_kwargs={"endpoint_url": endpoint}).mkdir("bench")  # fmt: skip
            _prefect(env, "work-pool", "create", "gens", "--type", "process")
            _prefect(env, "--no-prompt", "deploy", "flows/generate.py:scalerl_generate",
                     "--name", "gen", "--pool", "gens")  # fmt: skip
            for name in ("a", "b"):
                home = tmp / name
                for sub in ("home", "tmp", "cache"):
                    (home / sub).mkdir(parents=True)
                wenv = {**env, **S3, "HOME": str(home / "home"), "TMPDIR": str(home / "tmp"),
                        "SCALERL_CACHE": str(home / "cache"), "PREFECT_WORKER_QUERY_SECONDS": "1"}  # fmt: skip
                procs.append(
                    subprocess.Popen(
                        [
                            str(BIN / "prefect"),
                            "worker",
                            "start",
                            "--pool",
                            "gens",
                            "--type",
                            "process",
                            "--limit",
                            "1",
                        ],
                        env=wenv,
                        cwd=home,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )  # fmt: skip
                )
            url = f"s3://bench/{uuid.uuid4().hex[:8]}/runs"
            remote = ["placement.generators_deployment=scalerl-generate/gen"]
            runs = {
                "local": one_run("local", env, url, endpoint, args.steps, []),
                "pool-1": one_run("pool-1", env, url, endpoint, args.steps, remote),
                "pool-2": one_run(
                    "pool-2",
                    env,
                    url,
                    endpoint,
                    args.steps,
                    [*remote, "generation.num_generators=2"],
                ),  # fmt: skip
            }
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
    local_start = statistics.median(
        g["flow_started_to_registered_s"] for g in runs["local"]["generators"].values()
    )
    remote = [g for r in ("pool-1", "pool-2") for g in runs[r]["generators"].values()]
    report = {
        "machine": machine(),
        "steps": args.steps,
        "runs": runs,
        "two_over_one_generator_samples_per_s": round(
            runs["pool-2"]["trained_samples_per_s"] / runs["pool-1"]["trained_samples_per_s"], 3
        ),
        "pool_over_local_samples_per_s": round(
            runs["pool-1"]["trained_samples_per_s"] / runs["local"]["trained_samples_per_s"], 3
        ),
        "generator_start_s": {
            "local_task_flow_start_to_registered": local_start,
            "flow_run_created_to_registered_median": statistics.median(
                g["created_to_registered_s"] for g in remote
            ),
            "worker_pickup_median": statistics.median(g["created_to_started_s"] for g in remote),
        },
    }
    report["generator_start_s"]["orchestration_overhead_per_flow_run"] = round(
        report["generator_start_s"]["flow_run_created_to_registered_median"] - local_start, 2
    )
    emit(report, args.out)


if __name__ == "__main__":
    main()
