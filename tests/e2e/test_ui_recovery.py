"""Recovery as a user does it in the Prefect UI, with real processes: a server, `prefect deploy`,
a process worker. A deployed run is SIGKILLed mid-run and retried exactly as the UI's Retry does
(set_state Scheduled/AwaitingRetry, force false); the same ScaleRL run finishes. A second run,
killed the same way, is resumed by the scalerl-resume deployment given only its run id. Then the
run's plots artifact is opened in headless Chromium (Debian's package, driven by playwright) and
its pictures must be rendered, and the evaluations table shown."""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from runtime.verify import verify_run
from storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _prefect(env, *args, timeout=300, check=True):
    out = subprocess.run(
        [str(BIN / "prefect"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert not check or out.returncode == 0, (
        f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout


def _api(env, coro_fn):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def call():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(call())


def _worker(env, log: Path) -> subprocess.Popen:
    """One `prefect worker start --run-once`: it runs the next scheduled flow run, then exits."""
    return subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "scalerl-process", "--run-once"],
        env=env,
        cwd=REPO,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _runs(proc, what: str = "prefect.engine") -> bool:
    """Whether `proc`'s command line names `what`; a process that ended (or is a zombie) under
    us while we look does not (psutil raises for its command line)."""
    import psutil

    try:
        return what in " ".join(proc.cmdline())
    except psutil.Error:  # NoSuchProcess, ZombieProcess, AccessDenied
        return False


def _kill_flow_run_process(worker: subprocess.Popen, root: Path, past_step: int) -> str:
    """SIGKILL the worker's flow-run process (`python -m prefect.engine`) once the run's trainer
    has published weights past `past_step`; returns the run id found under `root`."""
    import psutil

    store, deadline = open_store(str(root)), time.monotonic() + 300
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the worker ended before the run got far enough"
        runs = store.list_runs()
        if runs and (store.run(runs[0]).latest_weights_version() or 0) > past_step:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the run did not pass step {past_step} in 300 s")
    (engine,) = [p for p in psutil.Process(worker.pid).children(recursive=True) if _runs(p)]
    engine.send_signal(signal.SIGKILL)
    worker.wait(timeout=120)  # --run-once: it reports the crash and exits
    return runs[0]


def _config(root: Path, max_steps: int, run_id: str | None) -> dict:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][1]["parameters"][
        "config"
    ]
    config["storage"] = {"url": str(root), "run_id": run_id}
    config["schedule"]["max_steps"] = max_steps
    config["trainer"]["checkpoint_every"] = 5
    config["evaluation"]["every_steps"] = 5
    config["data"]["num_eval_prompts"] = 16
    return config


def _one_row_per_step(run, max_steps: int) -> None:
    steps = sorted(run.read_metrics("trainer").column("step").to_pylist())
    assert steps == list(range(1, max_steps + 1))


def _unfinished_task_runs(env, flow_run_ids) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read(client):
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids)))
        )
        return [t.name for t in runs if t.state.type.value in ("RUNNING", "PENDING")]

    return _api(env, read)


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    env = {**prefect_server, "SCALERL_CHAOS": ""}
    _prefect(env, "work-pool", "create", "scalerl-process", "--type", "process", check=False)
    _prefect(env, "--no-prompt", "deploy", "--name", "scalerl-tiny-cpu")
    _prefect(env, "--no-prompt", "deploy", "--name", "scalerl-resume")
    return env, tmp_path_factory.mktemp("ui-recovery")


@pytest.fixture(scope="module")
def retried_run(deployed):
    """A run started from the tiny-cpu deployment with no run id, SIGKILLed at step > 7 (after
    its checkpoint at 5), then retried as the UI does; returns (env, run, flow run, max_steps)."""
    from prefect.states import Scheduled

    env, tmp = deployed
    root, max_steps = tmp / "runs", 16
    out = _prefect(
        env,
        "deployment",
        "run",
        "scalerl-run/scalerl-tiny-cpu",
        "--params",
        json.dumps({"config": _config(root, max_steps, None)}),
    )
    flow_run_id = out.split("UUID:")[1].split()[0]
    run_id = _kill_flow_run_process(_worker(env, tmp / "worker.log"), root, past_step=7)
    crashed = _api(env, lambda c: c.read_flow_run(flow_run_id))
    assert crashed.state.type.value == "CRASHED", crashed.state

    # The UI's Retry: the same flow run, scheduled again, same parameters (run_id None)
    result = _api(
        env,
        lambda c: c.set_flow_run_state(
            flow_run_id, Scheduled(name="AwaitingRetry", message="Retry from the UI"), force=False
        ),
    )
    assert result.status.value == "ACCEPT", result
    assert _worker(env, tmp / "worker.log").wait(timeout=600) == 0
    flow_run = _api(env, lambda c: c.read_flow_run(flow_run_id))
    return env, open_store(str(root)).run(run_id), flow_run, max_steps


def test_retry_from_the_ui_resumes_the_same_run(retried_run):
    env, run, flow_run, max_steps = retried_run
    assert flow_run.state.type.value == "COMPLETED", flow_run.state
    assert flow_run.run_count == 2
    assert flow_run.name == f"scalerl-run/{run.run_id}"
    assert f"run:{run.run_id}" in flow_run.tags
    # the same run finished; no second run was started
    assert open_store(str(Path(run.url).parent)).list_runs() == [run.run_id]
    assert run.read_status()["state"] == "finished"
    assert run.read_marker("flow_run")["attempt"] == 2
    report = verify_run(run)
    assert report.ok, report.problems
    _one_row_per_step(run, max_steps)
    # the first attempt's task runs (trainer, generators, stream) no longer show as Running
    assert _unfinished_task_runs(env, [flow_run.id]) == []


def test_resume_deployment_with_only_a_run_id(deployed):
    env, tmp = deployed
    root, max_steps = tmp / "runs-resume", 12
    _prefect(
        env,
        "deployment",
        "run",
        "scalerl-run/scalerl-tiny-cpu",
        "--params",
        json.dumps({"config": _config(root, max_steps, "resume-me")}),
    )
    _kill_flow_run_process(_worker(env, tmp / "worker.log"), root, past_step=6)
    out = _prefect(
        env,
        "deployment",
        "run",
        "scalerl-resume/scalerl-resume",
        "--params",
        json.dumps({"run_id": "resume-me", "storage_url": str(root)}),
    )
    flow_run_id = out.split("UUID:")[1].split()[0]
    assert _worker(env, tmp / "worker.log").wait(timeout=600) == 0
    flow_run = _api(env, lambda c: c.read_flow_run(flow_run_id))
    assert flow_run.state.type.value == "COMPLETED", flow_run.state
    assert flow_run.name == "scalerl-resume/resume-me"
    run = open_store(str(root)).run("resume-me")
    assert run.read_status()["state"] == "finished"
    assert verify_run(run).ok
    _one_row_per_step(run, max_steps)
    # the killed flow run and its task runs were closed by the resume
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    tagged = _api(
        env,
        lambda c: c.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["run:resume-me"]))
        ),
    )
    assert {f.state.type.value for f in tagged} <= {"COMPLETED", "CRASHED"}
    assert _unfinished_task_runs(env, [f.id for f in tagged]) == []


def _skip_community_dialog(page) -> None:
    """A fresh Prefect UI greets a new browser with a "Join the Prefect Community" dialog over
    the page; a person presses Skip."""
    with contextlib.suppress(Exception):  # not shown (e.g. already dismissed): nothing to do
        page.get_by_role("button", name="Skip").click(timeout=5_000)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_plots_are_pictures_in_the_ui(retried_run, tmp_path):
    from playwright.sync_api import sync_playwright
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    env, run, _, _ = retried_run

    def latest(what):
        key = f"scalerl-{run.run_id}-{what}".lower()
        return _api(
            env,
            lambda c: c.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,
                limit=1,
            ),
        )[0]

    plots, table = latest("plots"), latest("evaluations")
    evaluated = sorted(run.read_metrics("eval").column("step").to_pylist())
    ui = env["PREFECT_UI_URL"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 2400})
        page.goto(f"{ui}/artifacts/artifact/{plots.id}")
        _skip_community_dialog(page)
        page.wait_for_selector("img[src^='data:image/png']", timeout=60_000)
        page.wait_for_function(
            "() => Array.from(document.images).filter(i => i.src.startsWith('data:image/png')"
            " && i.complete && i.naturalWidth > 0).length >= 3",
            timeout=30_000,
        )
        images = page.evaluate(
            "() => Array.from(document.images).filter(i => i.src.startsWith('data:'))"
            ".map(i => [i.alt, i.naturalWidth, i.naturalHeight])"
        )
        page.screenshot(path=str(tmp_path / "plots.png"), full_page=True)
        page.goto(f"{ui}/artifacts/artifact/{table.id}")
        _skip_community_dialog(page)
        page.wait_for_selector("table", timeout=60_000)
        cells = page.locator("table tbody tr").count()
        header = page.locator("table thead").inner_text()
        page.screenshot(path=str(tmp_path / "evaluations.png"), full_page=True)
        browser.close()
    if os.environ.get("SCALERL_SCREENSHOTS"):  # keep them to look at
        for name in ("plots.png", "evaluations.png"):
            shutil.copy(tmp_path / name, Path(os.environ["SCALERL_SCREENSHOTS"]) / name)
    assert len(images) == 3, images  # curve, lengths, staleness
    assert all(w == 800 and h == 500 for _, w, h in images), images  # plots.PIXELS
    assert "Held-out pass rate" in images[0][0]
    assert "held-out pass rate" in header and "version" in header
    assert cells == len(evaluated)


def test_scalerl_resume_runs_a_flow_run_of_the_resume_deployment(deployed):
    """`scalerl resume` against a server that has the scalerl-resume deployment: its flow run
    belongs to the deployment (not picked up by any worker: it runs in the CLI's process), and
    the flow run the killed `scalerl run` left Running is set to Crashed."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    env, tmp = deployed
    root = tmp / "runs-cli"
    killed = subprocess.run(
        [
            str(BIN / "scalerl"),
            "run",
            "--preset",
            "tiny-cpu",
            "--storage",
            str(root),
            "--run-id",
            "cli-resume",
            "--set",
            "schedule.max_steps=4",
            "--set",
            "trainer.checkpoint_every=2",
            "--set",
            "evaluation.every_steps=100",
            "--set",
            "data.num_eval_prompts=8",
        ],
        env={**env, "SCALERL_CHAOS": "trainer.after_publish:3"},
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess.run(
        [str(BIN / "scalerl"), "resume", "cli-resume", "--storage", str(root)],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "run cli-resume: step 4" in resumed.stdout
    deployment = _api(env, lambda c: c.read_deployment_by_name("scalerl-resume/scalerl-resume"))
    tagged = _api(
        env,
        lambda c: c.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["run:cli-resume"]))
        ),
    )
    by_name = {f.name: f for f in tagged}
    assert set(by_name) == {"scalerl-run/cli-resume", "scalerl-resume/cli-resume"}
    resume = by_name["scalerl-resume/cli-resume"]
    assert resume.deployment_id == deployment.id
    assert resume.state.type.value == "COMPLETED"
    assert by_name["scalerl-run/cli-resume"].state.type.value == "CRASHED"
    assert _unfinished_task_runs(env, [f.id for f in tagged]) == []
    run = open_store(str(root)).run("cli-resume")
    assert run.read_status()["state"] == "finished" and verify_run(run).ok


def test_a_process_that_ends_while_it_is_looked_for_is_skipped():
    """A worker child that became a zombie between children() and cmdline() made the recovery
    tests fail with psutil.ZombieProcess under load: the lookup treats it as not the engine."""
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(child.pid)
    deadline = time.monotonic() + 10
    while proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.02)  # exited, not reaped: a zombie
    assert proc.status() == psutil.STATUS_ZOMBIE
    with pytest.raises(psutil.ZombieProcess):
        proc.cmdline()
    assert _runs(proc, "python") is False
    child.wait()
    assert _runs(proc, "python") is False  # reaped: no such process
