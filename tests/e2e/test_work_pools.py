"""A run spread over simulated machines on Prefect work pools, sharing only the S3-protocol
server (placement.generators_deployment and trainer_deployment; tasks/generator_pool.py,
tasks/trainer_nodes.py).

Machines on 127.0.0.1, each a directory of its own (HOME, TMPDIR, SCALERL_CACHE, working
directory): A runs a process worker of pool `pool-a` (generators) and one of `pool-t` (trainer
nodes); B runs the other `pool-t` worker; C starts a generator by hand (the scalerl-generate
flow). The run flow (this test's process tree) starts its 2 generators as child flow runs on
A, and its trainer as 2 nodes x 1 gloo rank, one per `pool-t` worker (each worker takes one
flow run at a time), joined by a c10d rendezvous that node 0 publishes in the store. One
generator's flow-run process is SIGKILLed mid-run: the run replaces it; the gate counts the
hand-started generator while its heartbeat lives; the run finishes, verifies clean, no group
was dropped as stale, and the API shows every role's flow run under the run's.
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

from runtime.registry import live_generators
from runtime.verify import verify_run
from storage import open_store
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


def test_a_run_over_work_pools_replaces_a_lost_generator_and_trains_on_two_nodes(
    prefect_server, moto_endpoint, tmp_path
):
    url, run_id = f"s3://scalerl-test/{uuid.uuid4().hex[:8]}/runs", "remote-gens"
    a_env, a_dir = _machine(tmp_path, "machine-a", prefect_server)
    c_env, c_dir = _machine(tmp_path, "machine-c", prefect_server)
    b_env, b_dir = _machine(tmp_path, "machine-b", prefect_server)
    for pool in ("pool-a", "pool-t"):
        _prefect(prefect_server, "work-pool", "create", pool, "--type", "process")
    _prefect(
        prefect_server, "--no-prompt", "deploy", "flows/generate.py:scalerl_generate",
        "--name", "gen-a", "--pool", "pool-a",
    )  # fmt: skip
    _prefect(
        prefect_server, "--no-prompt", "deploy", "flows/train_node.py:scalerl_train_node",
        "--name", "train-t", "--pool", "pool-t",
    )  # fmt: skip
    workers, logs = [], []
    for env, where, pool, limit in (
        (a_env, a_dir, "pool-a", []),
        (a_env, a_dir, "pool-t", ["--limit", "1"]),
        (b_env, b_dir, "pool-t", ["--limit", "1"]),
    ):
        logs.append(open(where / f"worker-{pool}.log", "a"))  # noqa: SIM115 - closed below
        workers.append(
            subprocess.Popen(
                [
                    str(BIN / "prefect"),
                    "worker",
                    "start",
                    "--pool",
                    pool,
                    "--type",
                    "process",
                    *limit,
                ],
                env=env,
                cwd=where,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )
    worker = workers[0]
    log = tmp_path / "run.log"
    proc = start_run(
        {**prefect_server, **S3},
        [
            f"storage.url={url}",
            f"storage.endpoint_url={moto_endpoint}",
            f"storage.run_id={run_id}",
            "placement.generators_deployment=scalerl-generate/gen-a",
            "generation.num_generators=2",
            "placement.trainer_deployment=scalerl-train-node/train-t",
            "placement.nodes=2",
            "placement.trainer_ranks=2",
            f"schedule.max_steps={STEPS}",
            "trainer.checkpoint_every=2",
            "evaluation.every_steps=100",
            "data.num_eval_prompts=8",
        ],
        log,
    )
    hand = None
    watch = open_store(
        url,
        storage_options={
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": moto_endpoint},
        },
    )
    run = None
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
                run = run or watch.run(run_id)  # once prepare_run has created it
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
        for p in (proc, hand, *workers):
            if p is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for f in logs:
            f.close()
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
    nodes = {r.name: r for r in runs if "role:trainer" in r.tags}
    assert set(nodes) == {f"{run_id}/trainer-node0", f"{run_id}/trainer-node1"}
    assert all(r.state.type.value == "COMPLETED" for r in nodes.values())
    assert all(parents[name] == str(parent.id) for name in nodes)
    # each node ran on its own machine: the workers' logs name the flow runs they started.
    # (Both workers may try to submit the same flow run; the loser logs "Aborted submission
    # of flow run ID", so the id alone does not say who ran it.)
    took = {m: (tmp_path / m / "worker-pool-t.log").read_text() for m in ("machine-a", "machine-b")}
    for r in nodes.values():
        started = f"Flow run '{r.name}' submitted to infrastructure"
        assert sum(started in text for text in took.values()) == 1
    assert all(
        any(f"Flow run '{r.name}' submitted to infrastructure" in took[m] for r in nodes.values())
        for m in took
    )
    # the checkpoint holds both nodes' DCP shards (rank 1's uploaded from its own node)
    step = run.latest_checkpoint_step()
    files = run.load_checkpoint(step, tmp_path / "ckpt", files=None)
    shards = sorted(p.name for p in (Path(files) / "dcp").iterdir() if p.suffix == ".distcp")
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
