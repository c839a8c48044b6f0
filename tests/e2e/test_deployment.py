"""The whole Prefect path with real processes: server, process work pool, `prefect deploy` from
prefect.yaml, `prefect deployment run` with parameters, a worker; the run completes and its
artifacts are visible through the API."""

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _prefect(env, *args, timeout=300):
    out = subprocess.run(
        [str(BIN / "prefect"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, (
        f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout


def test_deploy_run_and_watch_through_the_api(prefect_server, tmp_path):
    env = prefect_server
    # the session's server may have the pool already (test_ui_recovery.py creates it too)
    _prefect(env, "work-pool", "create", "scalerl-process", "--type", "process", "--overwrite")
    _prefect(env, "--no-prompt", "deploy", "--name", "scalerl-tiny-cpu")
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][1]["parameters"][
        "config"
    ]
    config["storage"] = {"url": str(tmp_path / "runs"), "run_id": "deployed-run"}
    config["schedule"]["max_steps"] = 2
    config["evaluation"]["every_steps"] = 1
    config["data"]["num_eval_prompts"] = 8
    out = _prefect(
        env,
        "deployment",
        "run",
        "scalerl-run/scalerl-tiny-cpu",
        "--params",
        json.dumps({"config": config}),
    )
    assert "Created flow run" in out
    created = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert created, out
    _prefect(env, "worker", "start", "--pool", "scalerl-process", "--run-once", timeout=600)

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            artifacts = await client.read_artifacts()
            return runs, artifacts

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        runs, artifacts = asyncio.run(read())
    # The server is shared with the other e2e tests (test_ui_recovery runs deployments too, and
    # leaves SIGKILLed flow runs behind): look at the flow run this test created only.
    deployed = [r for r in runs if str(r.id) == created.group(1)]
    assert [r.state.type.value for r in deployed] == ["COMPLETED"]
    keys = {a.key for a in artifacts}
    assert {
        "scalerl-deployed-run-progress",
        "scalerl-deployed-run-metrics",
        "scalerl-deployed-run-report",
    } <= keys
    run = open_store(str(tmp_path / "runs")).run("deployed-run")
    assert run.list_weight_versions() == [0, 1, 2]
    assert run.read_status()["state"] == "finished"
