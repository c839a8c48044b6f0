"""The trainer under torchrun inside a whole run (runtime/torchrun.py): 2 gloo ranks and 2
generators on CPU, the same launcher GPUs use with NCCL.

1. The run finishes, verify is clean, and the weights it published after its last step equal
   (to float tolerance) what ONE process trains from the same shards, replayed here in commit
   order with the run's own trainer code: the two ranks split every batch and sum their
   gradients, which must change nothing but the summation order. The replay's ledger (which
   groups went into which step) must equal the run's, or the comparison would be meaningless.
2. SIGKILL of trainer rank 1 mid-run: torchrun takes rank 0 down, the task fails and is retried,
   the new group resumes from the newest checkpoint, the run finishes and verify is clean.
"""

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from runtime.verify import verify_run
from storage import open_store
from tests.e2e.conftest import start_run, wait_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

P, G = 4, 8
BASE = [
    "placement.trainer_ranks=2",
    "generation.num_generators=2",
    f"generation.prompts_per_batch={P}",
    f"generation.samples_per_prompt={G}",
    "evaluation.every_steps=100",
    "data.num_eval_prompts=8",
    "trainer.checkpoint_every=2",
]


def _start(env: dict, root: Path, run_id: str, log: Path, steps: int):
    overrides = [f"storage.url={root}", f"storage.run_id={run_id}", *BASE]
    return start_run(env, [*overrides, f"schedule.max_steps={steps}"], log)


def _replay_one_process(run, steps: int, tmp: Path) -> tuple[dict, list]:
    """One Trainer process over the run's committed filtered shards, in commit order."""
    from runtime.common import WeightCache
    from runtime.trainer_io import RunShardSource
    from scalerl.config import RunConfig
    from scalerl.trainer import Trainer, TrainerOptions

    class Published:
        def __init__(self) -> None:
            self.versions: dict[int, dict] = {}

        def publish(self, version, model, tokenizer, state_dict=None) -> None:
            sd = state_dict if state_dict is not None else model.state_dict()
            self.versions[version] = {k: v.detach().clone() for k, v in sd.items()}

        def latest_version(self):
            return max(self.versions) if self.versions else None

    class NoCheckpoints:
        def latest_step(self):
            return None

        def save(self, step, local_dir) -> None:
            pass

    class Rows:
        def append(self, rows) -> None:
            pass

    config = RunConfig.model_validate(run.read_config())
    pub = Published()
    trainer = Trainer(
        config,
        run_id=run.run_id,
        # rank=1: a reader that writes nothing into the finished run (no marker, no quarantine)
        source=RunShardSource(run, "filtered", rank=1),
        publisher=pub,
        checkpoints=NoCheckpoints(),
        metrics=Rows(),
        options=TrainerOptions(
            model_path=str(WeightCache(run, tmp / "w").path(0)),
            max_steps=steps,
            poll_interval_s=0.01,
            idle_timeout_s=1.0,
        ),
    )
    summary = trainer.train()
    assert summary.version == steps, summary
    return pub.versions[steps], trainer.ledger


def _published(run, version: int, tmp: Path) -> dict:
    from safetensors.torch import load_file

    from runtime.common import WeightCache

    path = WeightCache(run, tmp / "live").path(version)
    return load_file(str(path / "model.safetensors"))


def test_two_gloo_ranks_and_two_generators_train_like_one_process(prefect_server, tmp_path):
    root, run_id, steps = tmp_path / "runs", "torchrun-2", 5
    log = tmp_path / "run.log"
    proc = _start(prefect_server, root, run_id, log, steps)
    assert wait_run(proc, log, 300) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "[rank 0] trainer stopped at version" in text, text[-4000:]
    run = open_store(str(root)).run(run_id)
    report = verify_run(run)
    assert report.ok, report.problems
    assert run.read_status()["state"] == "finished"
    generators = {
        g
        for s in run.list_shards("raw")
        for g in run.read_shard("raw", s.key)["generator_id"].to_pylist()
    }
    assert generators == {"gen0", "gen1"}
    # the run's ledger: which shards' groups each step trained on (checkpoint at the end)
    live = open_store(str(root)).run(run_id)
    weights, ledger = _replay_one_process(live, steps, tmp_path)
    from runtime.trainer_io import RunCheckpointStore

    ckpt = RunCheckpointStore(run).load(steps, tmp_path / "ckpt")
    import json

    lines = (ckpt / "ledger.jsonl").read_text().splitlines()
    live_ledger = [json.loads(line) for line in lines if line]
    assert [e["groups"] for e in ledger] == [e["groups"] for e in live_ledger]
    published, base = _published(run, steps, tmp_path), _published(run, 0, tmp_path)
    compared = [name for name in weights if name in published]  # a tied head is saved once
    assert len(compared) == len(published) > 10
    assert any(not torch.equal(published[n], base[n]) for n in compared), "nothing was trained"
    for name in compared:
        w = weights[name].to(published[name].dtype)
        torch.testing.assert_close(published[name], w, atol=2e-5, rtol=1e-4)


def _rank_process(rank: int):
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "runtime.trainer_rank" in cmd:
            with contextlib.suppress(psutil.Error):
                if p.environ().get("RANK") == str(rank):
                    return p
    return None


def test_sigkill_of_one_rank_is_retried_and_resumed(prefect_server, tmp_path):
    root, run_id, steps = tmp_path / "runs", "torchrun-kill", 12
    log = tmp_path / "run.log"
    proc = _start(prefect_server, root, run_id, log, steps)
    killed = None
    try:
        deadline = time.monotonic() + 240
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            with contextlib.suppress(Exception):
                run = open_store(str(root)).run(run_id)
                rows = run.read_metrics("trainer")
                if rows is not None and rows.num_rows and max(rows.column("step").to_pylist()) >= 3:
                    target = _rank_process(1)
                    if target is not None:
                        target.kill()
                        killed = max(rows.column("step").to_pylist())
        assert killed is not None, f"rank 1 was never seen mid-run:\n{log.read_text()[-4000:]}"
        assert wait_run(proc, log, 300) == 0, log.read_text()[-4000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "resumed from checkpoint" in text, text[-4000:]
    run = open_store(str(root)).run(run_id)
    assert run.read_status()["state"] == "finished"
    report = verify_run(run)
    assert report.ok, report.problems
    assert max(run.read_metrics("trainer").column("step").to_pylist()) == steps
