"""FSDP2 under torchrun (distributed.py): 2 ranks train like one process on the same shards.
The ranks build the model on the meta device, load their slices of the weights, checkpoint with
torch.distributed.checkpoint (no optimizer.pt: no full gather), resume from it, and one process
resumes the 2-rank checkpoint (another world size) exactly where the single process is.

The CPU variant (gloo) runs in CI; the CUDA variant (NCCL, bf16-capable) needs 2 GPUs. The
process group gets trainer.collective_timeout_s, not torch's 10-minute default (recorded call).
FSDP2's FP32 head and the tied-weight publish: test_fsdp_fp32_head.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from scalerl.config import load_config
from scalerl.trainer import Trainer, TrainerOptions

sys.path.insert(0, sys.argv[3])
import conftest as kit  # the shared builders of this test directory

model_dir, out = sys.argv[1], Path(sys.argv[2])
plan = [int(x) for x in sys.argv[4].split(",")]  # max_steps of each Trainer, one after another
tables = {f"s{n}": kit.shard_table("r1", f"s{n}", [(f"a{n}", [0]), (f"b{n}", [0]), (f"c{n}", [0])], G=4, seed=n)
          for n in range(5)}

class DirCheckpoints(kit.MemoryCheckpoints):
    # Every rank sees rank 0's checkpoints, as with a shared run store.
    def latest_step(self):
        steps = [int(p.name.split("-")[1]) for p in self.root.glob("step-*")]
        return max(steps) if steps else None

root = Path(sys.argv[5]) if len(sys.argv) > 5 else out.parent / (out.stem + "-ckpt")
root.mkdir(exist_ok=True)
pub, met, ck = kit.MemoryPublisher(), kit.MemoryMetrics(), DirCheckpoints(root)
for max_steps in plan:  # e.g. 3 steps, then a new Trainer resumes from checkpoint 3 for step 4
    cfg = kit.tiny_config(Path(model_dir), generation={"prompts_per_batch": 3},
                          schedule={"max_steps": max_steps}, trainer={"micro_batch_tokens": 48},
                          pipeline={"max_off_policy_steps": 8})
    trainer = Trainer(cfg, run_id="r1", source=kit.MemorySource(tables), publisher=pub,
                      checkpoints=ck, metrics=met,
                      options=TrainerOptions(poll_interval_s=0.01, idle_timeout_s=0.05))
    summary = trainer.train()
    if dist.is_initialized():
        dist.barrier()  # checkpoint 3 is on disk before any rank looks for it
if trainer.is_main:
    torch.save({"weights": pub.versions[summary.version], "losses": [r["loss"] for r in met.rows],
                "ckpts": sorted(p.name for p in root.glob("step-*")),
                "sharded": sorted(p.name for p in root.glob("step-*") if (p / "dcp").is_dir()),
                "optimizer_pt": sorted(p.parent.name for p in root.glob("step-*/optimizer.pt"))}, out)
"""


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _single_vs_sharded(model_dir, tmp_path, env) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    here = str(Path(__file__).parent)
    single, sharded = tmp_path / "single.pt", tmp_path / "sharded.pt"
    _run([sys.executable, str(script), str(model_dir), str(single), here, "3,4,5"], env)
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(script), str(model_dir), str(sharded), here, "3,4"],
        env,
    )  # fmt: skip
    a, b = torch.load(single), torch.load(sharded)
    assert b["ckpts"] == b["sharded"] == ["step-3", "step-4"]  # ranks wrote DCP shards ...
    assert b["optimizer_pt"] == [] and a["optimizer_pt"] == a["ckpts"]  # ... no full gather
    assert len(a["losses"]) == 5  # steps 4 and 5 ran after resumes
    assert a["losses"][:4] == pytest.approx(b["losses"], rel=1e-4, abs=1e-5)
    # the 2-rank checkpoint resumed by ONE process (DCP reshards on load) trains step 5 as the
    # single process did after its own checkpoint 4
    cross, root = tmp_path / "cross.pt", tmp_path / "cross-ckpt"
    shutil.copytree(tmp_path / "sharded-ckpt", root)
    _run([sys.executable, str(script), str(model_dir), str(cross), here, "5", str(root)], env)
    c = torch.load(cross)
    assert c["losses"] == pytest.approx(a["losses"][4:], rel=1e-4, abs=1e-5)
    assert a["weights"].keys() == c["weights"].keys()
    for name, w in a["weights"].items():
        torch.testing.assert_close(c["weights"][name].cpu(), w.cpu(), atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_fsdp2_with_two_cpu_ranks_matches_one_process(tiny_model_dir, tmp_path):
    # The same code path as on GPUs, with gloo on CPU: sharding, row split, padded micro-batch
    # counts, gradient sum, metric reduction and full-state gathering for publish/checkpoint.
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    _single_vs_sharded(tiny_model_dir, tmp_path, env)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fsdp2_on_two_gpus_matches_one_process(tiny_model_dir, tmp_path):
    _single_vs_sharded(tiny_model_dir, tmp_path, {**os.environ, "PYTHONPATH": str(REPO)})


def test_process_group_gets_the_collective_timeout(monkeypatch):
    # Rank 0 alone downloads the resume checkpoint while the others wait in a collective: the
    # group must not keep torch's 10-minute default. The call is recorded, not made.
    import torch.distributed as dist

    from scalerl.config import load_config
    from scalerl.trainer.distributed import DataParallel

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    cfg = load_config(overrides=["trainer.collective_timeout_s=5400"])
    dp = DataParallel.from_env(cfg.trainer.collective_timeout_s)
    assert (dp.rank, dp.world_size, dp.device) == (0, 2, "cpu")
    assert calls[-1] == {"backend": "gloo", "timeout": timedelta(seconds=5400)}
    DataParallel.from_env()  # without a value: the config's default, one hour
    assert load_config().trainer.collective_timeout_s == 3600
    assert calls[-1]["timeout"] == timedelta(hours=1)


@pytest.mark.parametrize("bad", ["10", "100000"])
def test_collective_timeout_out_of_bounds_is_refused(bad):
    from scalerl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="collective_timeout_s"):
        load_config(overrides=[f"trainer.collective_timeout_s={bad}"])
