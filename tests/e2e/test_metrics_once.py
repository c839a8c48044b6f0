"""A crash + resume counts every trained sample once: a tiny run whose trainer is SIGKILLed
after a checkpoint and some later steps, then resumed from that checkpoint (so those steps are
trained again and their metrics rows written twice), reads back one trainer row per step, a
staleness histogram that sums to the samples trained, and one eval row per version.

The same run is mirrored into a real MLflow tracking server (started here on 127.0.0.1) and
TensorBoard (runtime/tracking/): the resumed run continues the SAME MLflow run and every trainer
step is there once, with the evaluations at their versions, the plots and the final status; a
planted secret is in no tracker's data; `scalerl runs track` back-fills the finished run into
another tracker from the store. (One pair of runs for both: each is ~20 s of a 2-core machine.)"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from runtime.evaluation import compute_at
from runtime.verify import verify_run
from scalerl.config import load_config
from scalerl.stats import eval_points, staleness_histogram
from storage import open_store
from tests.e2e.conftest import BIN, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS, CHECKPOINT_EVERY, KILL_AT = 6, 3, 6  # killed after publishing v6, before its row
P, G = 4, 8  # prompts per batch, samples per prompt
OVERRIDES = [
    f"schedule.max_steps={MAX_STEPS}",
    f"trainer.checkpoint_every={CHECKPOINT_EVERY}",
    f"generation.prompts_per_batch={P}",
    f"generation.samples_per_prompt={G}",
    "evaluation.every_steps=3",
    "data.num_eval_prompts=8",
    "evaluation.samples_per_prompt=4",
]
SECRET = "PLANTED-e2e-s3cr3t-4Kq"
SCRIPT = """
import sys
from scalerl.config import load_config
from flows.run import scalerl_run
if __name__ == "__main__":
    root, run_id = sys.argv[1], sys.argv[2]
    cfg = load_config(preset="tiny-cpu", overrides=[
        f"storage.url={root}", f"storage.run_id={run_id}", *sys.argv[3:]])
    scalerl_run(cfg)
"""


@pytest.fixture
def mlflow_server(tmp_path):
    """An MLflow tracking server on loopback (SQLite store, local artifacts); its URL."""
    port, home = free_port(), tmp_path / "mlflow"
    home.mkdir()
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
         "--default-artifact-root", str(home / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/health", timeout=2) as r,
        ):
            if r.status == 200:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(
                f"mlflow server did not start:\n{(home / 'server.log').read_text()[-3000:]}"
            )
        time.sleep(0.5)
    try:
        yield url, home
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _run(env: dict, root: Path, run_id: str, log: Path, chaos: str | None, extra: list[str]) -> int:
    env = {k: v for k, v in env.items() if k != "SCALERL_CHAOS"}
    if chaos:
        env["SCALERL_CHAOS"] = chaos
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(root), run_id, *OVERRIDES, *extra],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        return proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end in time:\n{log.read_text()[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # generators, reward workers
            os.killpg(proc.pid, signal.SIGKILL)


def _ledger(run) -> list[dict]:
    step = run.latest_checkpoint_step()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(run.load_checkpoint(step, Path(tmp)))
        lines = (local / "ledger.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_steps_redone_after_a_crash_are_counted_once_in_the_store_and_the_trackers(
    prefect_server, mlflow_server, tmp_path
):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    url, mlflow_home = mlflow_server
    root, run_id = tmp_path / "runs", "redo"
    env = {**prefect_server, "SCALERL_TRACKING_INTERVAL_S": "1", "AWS_SECRET_ACCESS_KEY": SECRET}
    trackers = [
        f"tracking.mlflow.tracking_uri={url}",
        "tracking.mlflow.experiment=e2e",
        "tracking.tensorboard={}",
    ]
    config = load_config(preset="tiny-cpu", overrides=[f"storage.url={root}", *OVERRIDES])
    from runtime.common import materialize_base_model  # cached per machine; not on the clock

    materialize_base_model(config, tmp_path / "base-model")

    chaos = f"trainer.after_publish:{KILL_AT}"
    rc = _run(env, root, run_id, tmp_path / "crash.log", chaos, trackers)
    assert rc == -signal.SIGKILL, (tmp_path / "crash.log").read_text()[-4000:]
    run = open_store(str(root)).run(run_id)
    assert run.latest_checkpoint_step() == CHECKPOINT_EVERY
    before = run.read_metrics("trainer", all_rows=True).column("step").to_pylist()
    assert before == list(range(1, KILL_AT))  # 4 and 5 logged after the checkpoint at 3
    mlflow_key = f"mlflow {url} experiment e2e"  # the marker's progress is per destination
    first_id = run.read_marker("tracking")["sinks"][mlflow_key]["id"]

    rc = _run(env, root, run_id, tmp_path / "resume.log", None, trackers)
    assert rc == 0, (tmp_path / "resume.log").read_text()[-4000:]
    assert run.read_status()["state"] == "finished"

    # written: 1..5, then 4..6 again by the resumed trainer; read: 1..6 once each
    redone = range(CHECKPOINT_EVERY + 1, KILL_AT)
    every = Counter(run.read_metrics("trainer", all_rows=True).column("step").to_pylist())
    assert every == Counter(
        {**dict.fromkeys(range(1, MAX_STEPS + 1), 1), **dict.fromkeys(redone, 2)}
    )
    trainer = run.read_metrics("trainer")
    assert trainer.column("step").to_pylist() == list(range(1, MAX_STEPS + 1))

    # every trained completion once: P whole groups of G per step, as the ledger says
    assert config.completions_per_batch == P * G
    ledger = [e for e in _ledger(run) if e["outcome"] == "trained"]
    assert len(ledger) == MAX_STEPS
    from_ledger = sum(len(set().union(*e["groups"].values())) * G for e in ledger)
    assert from_ledger == MAX_STEPS * P * G
    assert sum(staleness_histogram(trainer).values()) == MAX_STEPS * P * G == 192
    # (all rows would have counted the redone steps again: 8 x 32 = 256 samples)

    # the fit's points: one per evaluated version, at that version's compute
    evals = run.read_metrics("eval")
    versions = evals.column("version").to_pylist()
    assert versions == sorted(set(versions)) and 0 in versions
    compute, _, steps = eval_points(evals)
    assert steps == versions
    assert compute == [compute_at(config, v) for v in versions] == [v * P * G for v in versions]

    report = verify_run(run)
    assert report.ok, report.problems
    assert report.facts["trainer_steps_redone"] == len(redone)
    assert report.facts["trainer_rows_replaced"] == len(redone)
    assert any("trained again after a resume" in note for note in report.notes)

    # -- the trackers: one MLflow run across the crash, each step once --------------------
    marker = run.read_marker("tracking")
    assert marker["sinks"][mlflow_key]["id"] == first_id  # the same MLflow run, continued
    assert marker["behind"] == {"mlflow": 0, "tensorboard": 0}

    client = MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert [r.info.run_id for r in runs] == [first_id]
    trainer = {r["step"]: r for r in run.read_metrics("trainer").to_pylist()}
    assert sorted(trainer) == list(range(1, MAX_STEPS + 1))
    history = client.get_metric_history(first_id, "trainer/loss")
    assert sorted(m.step for m in history) == sorted(trainer)  # one value per step
    evals = run.read_metrics("eval").to_pylist()
    pass_rates = client.get_metric_history(first_id, "eval/pass_rate")
    assert sorted((m.step, m.value) for m in pass_rates) == sorted(
        (e["version"], pytest.approx(e["pass_rate"])) for e in evals
    )
    assert {e["version"] for e in evals} >= {0, 3, 6}
    got = client.get_run(first_id)
    assert got.data.tags["scalerl.status"] == "finished" and got.info.status == "FINISHED"
    assert got.data.params["schedule.max_steps"] == str(MAX_STEPS)
    plots = {a.path for a in client.list_artifacts(first_id, "plots")}
    assert "plots/curve.png" in plots
    assert {a.path for a in client.list_artifacts(first_id, "completions")} == {
        f"completions/v{e['version']:06d}.json" for e in evals
    }

    acc = EventAccumulator(str(root / run_id / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("trainer/loss")] == sorted(trainer)
    assert "plots/curve" in acc.Tags()["images"]

    for path in [*mlflow_home.rglob("*"), *(root / run_id / "tensorboard").rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    # the back-fill: the finished run into a TensorBoard directory it never logged to
    backfill = tmp_path / "tb-backfill"
    out = subprocess.run(
        [str(BIN / "scalerl"), "runs", "track", run_id, "--storage", str(root),
         "--set", "tracking.mlflow=null", "--set", f"tracking.tensorboard.log_dir={backfill}"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "tensorboard: up to date" in out.stdout
    acc = EventAccumulator(str(backfill / run_id), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("trainer/loss")] == sorted(trainer)
