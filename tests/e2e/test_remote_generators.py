"""Generators on a Prefect work pool, sharing only the S3-protocol server with the run
(placement.generators_deployment, tasks/generator_pool.py, the generators' part of issue 21).

Simulated machines on 127.0.0.1: the run flow in this test's process tree; worker A, a process
worker of pool `pool-a`, in its own directory (own HOME, TMPDIR, SCALERL_CACHE, working
directory); a generator started by hand (the scalerl-generate flow) from a third directory.
Nothing is shared but the S3 endpoint (and the Prefect server). The run starts its 2 generators
as child flow runs of the `scalerl-generate/gen-a` deployment; one is SIGKILLed mid-run and the
run replaces it; the gate counts the hand-started generator while its heartbeat lives; the run
finishes, verifies clean, and no group was dropped as stale.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from storage import open_store
from tasks.rollouts import live_generators
from tasks.verify import verify_run
from tests.e2e.conftest import REPO, start_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = Path(sys.executable).parent
S3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
STEPS = 12


def _machine(root: Path, name: str, base: dict) -> tuple[dict, Path]:
    home = root / name
    for sub in ("home", "tmp", "cache"):
        (home / sub).mkdir(parents=True)
    env = {
        **base,
        **S3,
        "HOME": str(home / "home"),
        "TMPDIR": str(home / "tmp"),
        "SCALERL_CACHE": str(home / "cache"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    return env, home


def _prefect(env, *args, cwd=REPO, timeout=300):
    out = subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, (
        f"prefect {' '.join(args)}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
    )
    return out.stdout


async def _flow_runs(env, run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"run:{run_id}"]))
        )
        parents = {}
        for r in runs:
            if r.parent_task_run_id is not None:
                task_run = await client.read_task_run(r.parent_task_run_id)
                parents[r.name] = str(task_run.flow_run_id)
        return runs, parents


def flow_runs(env, run_id):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(_flow_runs(env, run_id))


def _flow_run_process(worker: subprocess.Popen, flow_run_id: str):
    """The worker's child process that runs flow run `flow_run_id`."""
    for child in psutil.Process(worker.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if (
                child.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id
                and child.ppid() == worker.pid
            ):
                return child
    return None


def test_generators_on_a_work_pool_are_replaced_and_counted(
    prefect_server, moto_endpoint, tmp_path
):
    url, run_id = f"s3://scalerl-test/{uuid.uuid4().hex[:8]}/runs", "remote-gens"
    a_env, a_dir = _machine(tmp_path, "machine-a", prefect_server)
    c_env, c_dir = _machine(tmp_path, "machine-c", prefect_server)
    _prefect(prefect_server, "work-pool", "create", "pool-a", "--type", "process")
    _prefect(
        prefect_server, "--no-prompt", "deploy", "flows/generate.py:scalerl_generate",
        "--name", "gen-a", "--pool", "pool-a",
    )  # fmt: skip
    worker_log = open(a_dir / "worker.log", "w")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "pool-a", "--type", "process"],
        env=a_env, cwd=a_dir, stdout=worker_log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    log = tmp_path / "run.log"
    proc = start_run(
        {**prefect_server, **S3},
        [
            f"storage.url={url}",
            f"storage.endpoint_url={moto_endpoint}",
            f"storage.run_id={run_id}",
            "placement.generators_deployment=scalerl-generate/gen-a",
            "generation.num_generators=2",
            f"schedule.max_steps={STEPS}",
            "trainer.checkpoint_every=2",
            "evaluation.every_steps=100",
            "data.num_eval_prompts=8",
        ],
        log,
    )
    hand = None
    watch = open_store(url, storage_options={"client_kwargs": {"endpoint_url": moto_endpoint}})
    run = watch.run(run_id)
    try:
        # 1. both remote generators commit shards; then SIGKILL one's flow-run process
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, (
                log.read_text()[-3000:],
                (a_dir / "worker.log").read_text()[-3000:],
            )
            with contextlib.suppress(Exception):
                keys = [s.key for s in run.list_shards("raw")]
                if {k.split("-")[0] for k in keys} >= {"gen0", "gen1"}:
                    break
            time.sleep(0.5)
        runs, _ = flow_runs(prefect_server, run_id)
        victim = next(r for r in runs if r.name == f"{run_id}/gen1")
        target = _flow_run_process(worker, str(victim.id))
        assert target is not None, "worker A's flow-run process for gen1 not found"
        target.send_signal(signal.SIGKILL)

        # 2. a generator started by hand from a third directory is counted while it lives
        hand = subprocess.Popen(
            [
                sys.executable, "-c",
                "import sys; from flows.generate import scalerl_generate; "
                "scalerl_generate(sys.argv[1], sys.argv[2], 'hand-0', endpoint_url=sys.argv[3])",
                url, run_id, moto_endpoint,
            ],
            env={**c_env, "PYTHONPATH": str(REPO)}, cwd=c_dir, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        seen_hand, replaced = False, False
        while proc.poll() is None and not (seen_hand and replaced):
            with contextlib.suppress(Exception):
                live = live_generators(run)
                seen_hand = seen_hand or "hand-0" in live
                replaced = replaced or "gen1-r1" in live
            time.sleep(0.5)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        for p in (proc, worker, hand):
            if p is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        worker_log.close()
    assert seen_hand, "the hand-started generator was never registered"
    assert replaced, "no replacement generator registered"
    text = log.read_text()
    assert "generator gen1 was lost" in text and "gen1-r1 replaces it" in text

    assert run.read_status()["state"] == "finished"
    report = verify_run(run)
    assert report.ok, report.problems
    trainer = run.read_metrics("trainer").to_pylist()
    assert len(trainer) == STEPS
    assert sum(r["samples_dropped_stale"] for r in trainer) == 0
    writers = {s.key.rsplit("-", 1)[0] for s in run.list_shards("raw")}
    assert {"gen0", "gen1"} <= writers  # gen1's shards from before the kill are kept

    runs, parents = flow_runs(prefect_server, run_id)
    parent = next(r for r in runs if r.name == f"scalerl-run/{run_id}")
    children = {r.name: r for r in runs if "role:generator" in r.tags}
    assert {f"{run_id}/gen0", f"{run_id}/gen1", f"{run_id}/gen1-r1"} <= set(children)
    assert all(parents[name] == str(parent.id) for name in children)  # linked under the run
    assert children[f"{run_id}/gen1"].state.type.value == "CRASHED"
    assert children[f"{run_id}/gen0"].state.type.value == "COMPLETED"
