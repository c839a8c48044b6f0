"""The CUDA branches that CI (no GPU) cannot run: marked gpu, run by `make gpu-test` on a GPU
machine (see README "GPU"). Each compares against a reference computed here.

- a single-rank trainer on cuda:0 (TrainerOptions.device, what tasks/train.py passes on cuda)
  trains the same first step as on the CPU, to bf16-free float32 tolerance;
- the FP32 head with a bf16 body on CUDA: float32 logits equal to the float64 product of the
  same bf16 hidden states and head weights;
- processes pinned by the placement plan see exactly their planned device.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from scalerl.trainer import Trainer, TrainerOptions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
RUN = "r1"


def _one_step(kit, model_dir, tmp_path, device: str) -> dict:
    tables = {"s0": kit.shard_table(RUN, "s0", [("a", [0]), ("b", [0])], G=4)}
    (tmp_path / device.replace(":", "")).mkdir()
    pub = kit.MemoryPublisher()
    trainer = Trainer(
        kit.tiny_config(model_dir),
        run_id=RUN,
        source=kit.MemorySource(tables),
        publisher=pub,
        checkpoints=kit.MemoryCheckpoints(tmp_path / device.replace(":", "")),
        metrics=kit.MemoryMetrics(),
        options=TrainerOptions(device=device, poll_interval_s=0.001, idle_timeout_s=0.05),
    )
    assert trainer.train().version == 1
    assert next(trainer.model.parameters()).device.type == torch.device(device).type
    return {k: v.float().cpu() for k, v in pub.versions[1].items()}


def test_single_rank_trainer_on_cuda_matches_cpu(kit, tiny_model_dir, tmp_path):
    cpu = _one_step(kit, tiny_model_dir, tmp_path, "cpu")
    gpu = _one_step(kit, tiny_model_dir, tmp_path, "cuda:0")
    for name, w in cpu.items():
        torch.testing.assert_close(gpu[name], w, atol=1e-4, rtol=1e-3)


def test_fp32_head_with_bf16_body_on_cuda(tiny_model_dir):
    from scalerl.fp32_head import fp32_logits
    from scalerl.models import load_policy

    model, _ = load_policy(str(tiny_model_dir), dtype="bfloat16", device="cuda")
    hidden = torch.randn(3, 5, model.config.hidden_size, device="cuda").to(torch.bfloat16)
    logits = fp32_logits(model, hidden)
    assert logits.dtype == torch.float32
    head = model.get_output_embeddings().weight
    assert head.dtype == torch.bfloat16
    reference = hidden.double() @ head.double().T  # exact for bf16 inputs up to fp64
    torch.testing.assert_close(logits.double(), reference, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_placed_processes_see_only_their_device():
    from runtime.common import process_env
    from scalerl.config import load_config

    cfg = load_config(
        overrides=[
            "placement.accelerator=cuda",
            f"placement.devices_per_node={torch.cuda.device_count()}",
            "placement.trainer_ranks=1",
            "generation.num_generators=1",
        ]
    )
    probe = (
        "import torch; print(torch.cuda.device_count(), torch.cuda.get_device_properties(0).uuid)"
    )

    def run(env: dict) -> str:
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.split()

    assert process_env(cfg, "gen0") == {"CUDA_VISIBLE_DEVICES": "1"}
    count, uuid = run(process_env(cfg, "gen0"))
    assert count == "1"
    assert uuid == str(torch.cuda.get_device_properties(1).uuid)
    count, uuid = run(process_env(cfg, "trainer@node0"))
    assert (count, uuid) == ("1", str(torch.cuda.get_device_properties(0).uuid))
