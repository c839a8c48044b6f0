"""Exact resume: 6 steps straight == 3 steps + SIGKILL of the process + resume to 6.

The training process is a real subprocess that trains against a local run store with
pre-committed shards of the tiny model (CPU, deterministic algorithms, one thread). The killed
run is killed after its step-3 checkpoint, while publishing weights 5, so the resumed process
redoes steps 4 and 5 (republishing identical weights) before step 6.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = "resume-run"
REPO = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import sys, time
from pathlib import Path
import torch
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
from scalerl.config import load_config
from scalerl.trainer import Trainer, TrainerOptions
from storage import open_store
from runtime.trainer_io import TrainerIO

store_url, run_id, model_dir, hang_at, marker, *extra = sys.argv[1:]
io = TrainerIO.over(open_store(store_url).run(run_id), stage="filtered", weights_dtype="float32")

class HangingPublisher:
    # Stands in for a process that dies mid-run: announces itself, then hangs until killed.
    def publish(self, version, model, tokenizer, state_dict=None):
        if version == int(hang_at):
            Path(marker).write_text("hanging")
            time.sleep(600)
        io.publisher.publish(version, model, tokenizer, state_dict)

    def latest_version(self):
        return io.publisher.latest_version()

cfg = load_config(preset="tiny-cpu", overrides=[
    f"model.name_or_path={model_dir}", "model.dtype=float32",
    "generation.prompts_per_batch=2", "generation.samples_per_prompt=4",
    "optimizer.lr=0.001", "optimizer.warmup_steps=2", "trainer.micro_batch_tokens=48",
    "trainer.checkpoint_every=3", "pipeline.max_off_policy_steps=8", "schedule.max_steps=6",
    *extra,
])
summary = Trainer(cfg, run_id=run_id, source=io.source, publisher=HangingPublisher(),
                  checkpoints=io.checkpoints, metrics=io.metrics,
                  options=TrainerOptions(poll_interval_s=0.01, idle_timeout_s=5.0)).train()
print("SUMMARY", summary)
"""


def _start(script: Path, store: Path, model_dir: Path, hang_at: int, marker: Path, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(script), str(store), RUN, str(model_dir), str(hang_at), str(marker)]
    args += list(extra)
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _prepare(kit, store: Path) -> None:
    from storage import open_store

    run = open_store(str(store)).run(RUN, create=True)
    for n in range(5):
        groups = [(f"g{n}-{j}", [max(0, n - 1), n // 2]) for j in range(3)]
        run.commit_shard("filtered", f"s{n}", kit.shard_table(RUN, f"s{n}", groups, G=4, seed=n))


def _final(store: Path, weights_file: str) -> tuple[str, bytes, dict]:
    import torch

    from storage import open_store

    run = open_store(str(store)).run(RUN)
    weights = run.download_weights(6, store.parent / f"{store.name}-w6")
    digest = hashlib.sha256((weights / weights_file).read_bytes()).hexdigest()
    ckpt = run.load_checkpoint(6, store.parent / f"{store.name}-c6")
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    return digest, (ckpt / "ledger.jsonl").read_bytes(), optimizer


# LoRA (model.lora): every version is the adapter alone (scalerl/lora.py), in float32 here,
# with the RMSNorms trained in full beside it
LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.trained_modules=[norm]")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "weights_file"),
    [((), "model.safetensors"), (LORA, "adapter/adapter_model.safetensors")],
    ids=["full", "lora"],
)
def test_sigkill_and_resume_is_bit_identical_to_a_straight_run(
    kit, tiny_model_dir, tmp_path, extra, weights_file
):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for store in (straight, killed):
        _prepare(kit, store)

    _finish(_start(script, straight, tiny_model_dir, -1, tmp_path / "unused", extra))

    marker = tmp_path / "hanging"
    proc = _start(script, killed, tiny_model_dir, hang_at=5, marker=marker, extra=extra)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the trainer never reached step 5"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    import torch

    from storage import open_store

    run = open_store(str(killed)).run(RUN)
    assert run.latest_checkpoint_step() == 3 and run.latest_weights_version() == 4
    out = _finish(_start(script, killed, tiny_model_dir, -1, tmp_path / "unused", extra))
    assert "version=6" in out

    digest_straight, ledger_straight, optim_straight = _final(straight, weights_file)
    digest_killed, ledger_killed, optim_killed = _final(killed, weights_file)
    assert digest_killed == digest_straight
    assert ledger_killed == ledger_straight
    assert ledger_straight.count(b'"outcome": "trained"') == 6
    # the optimizer state at step 6 (AdamW moments and step counts), tensor by tensor
    assert optim_killed["param_groups"] == optim_straight["param_groups"]
    assert optim_killed["state"].keys() == optim_straight["state"].keys()
    for i, moments in optim_straight["state"].items():
        for name, t in moments.items():
            assert torch.equal(optim_killed["state"][i][name], t), (i, name)
    if extra:  # the adapter's moments only: 2 adapters (A, B) x 7 projections x 2 layers,
        # and the 2 x 2 + 1 RMSNorms
        assert len(optim_straight["state"]) == 2 * 7 * 2 + 5
        weights = open_store(str(straight)).run(RUN).download_weights(6, tmp_path / "w6")
        assert sorted(p.name for p in weights.rglob("*") if p.is_file()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
