"""The CUDA branches that CI (no GPU) cannot run: marked gpu, run by `make gpu-test` on a GPU
machine (see README "GPU"). Each compares against a reference computed here.

- a single-rank trainer on cuda:0 (TrainerOptions.device, what tasks/train.py passes on cuda)
  trains the same first step as on the CPU: the same loss and gradients to float32 tolerance,
  and the same update wherever the gradient's sign is certain (see _one_step's test);
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
from torch.optim.optimizer import register_optimizer_step_pre_hook

from scalerl.trainer import Trainer, TrainerOptions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
RUN = "r1"


def _one_step(kit, model_dir, tmp_path, device: str) -> dict:
    """The first step on `device`: its loss, the gradients AdamW applied (after clipping) and
    the weights it published, all as float32 on the CPU, keyed by parameter name."""
    tables = {"s0": kit.shard_table(RUN, "s0", [("a", [0]), ("b", [0])], G=4)}
    (tmp_path / device.replace(":", "")).mkdir()
    pub, metrics = kit.MemoryPublisher(), kit.MemoryMetrics()
    grads: dict[int, torch.Tensor] = {}

    def record(optimizer, args, kwargs):  # the gradients the first optimizer step applies
        if not grads:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[id(p)] = p.grad.detach().float().cpu().clone()

    hook = register_optimizer_step_pre_hook(record)
    try:
        trainer = Trainer(
            kit.tiny_config(model_dir),
            run_id=RUN,
            source=kit.MemorySource(tables),
            publisher=pub,
            checkpoints=kit.MemoryCheckpoints(tmp_path / device.replace(":", "")),
            metrics=metrics,
            options=TrainerOptions(device=device, poll_interval_s=0.001, idle_timeout_s=0.05),
        )
        assert trainer.train().version == 1
    finally:
        hook.remove()
    assert next(trainer.model.parameters()).device.type == torch.device(device).type
    return {
        "loss": metrics.rows[0]["loss"],
        "grads": {n: grads[id(p)] for n, p in trainer.model.named_parameters() if id(p) in grads},
        "weights": {k: v.float().cpu() for k, v in pub.versions[1].items()},
        "lr": trainer.cfg.optimizer.lr,  # the most any step of the warmup applies
    }


def test_single_rank_trainer_on_cuda_matches_cpu(kit, tiny_model_dir, tmp_path):
    # AdamW's first step with eps 1e-15 moves every element by lr * g / |g| = +-lr (plus the
    # same decay on both devices): an element whose gradient is ~0 may take opposite signs on
    # CPU and GPU and land 2 lr apart. So: losses and gradients to float32 tolerance, and the
    # weights where |g| is far above the CPU/GPU gradient difference, where no sign can flip.
    cpu = _one_step(kit, tiny_model_dir, tmp_path, "cpu")
    gpu = _one_step(kit, tiny_model_dir, tmp_path, "cuda:0")
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-4, abs=1e-6)
    assert cpu["grads"].keys() == gpu["grads"].keys() and cpu["grads"]
    certain = total = 0
    for name, g in cpu["grads"].items():
        torch.testing.assert_close(gpu["grads"][name], g, atol=1e-5, rtol=1e-3)
        # no sign flip where |g| exceeds the worst CPU/GPU difference ten times over
        margin = 10 * float((gpu["grads"][name] - g).abs().max()) + 1e-12
        sure = g.abs() > margin
        w_cpu, w_gpu = cpu["weights"][name], gpu["weights"][name]
        torch.testing.assert_close(w_gpu[sure], w_cpu[sure], atol=1e-6, rtol=1e-5)
        # elsewhere at most a flipped step apart
        assert float((w_gpu - w_cpu).abs().max()) <= 2 * cpu["lr"] + 1e-6, name
        certain, total = certain + int(sure.sum()), total + g.numel()
    assert certain > total // 2, (certain, total)  # the exact comparison covers most weights


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

    # composed with this process's own list when one is set (local device 1 is its 2nd entry)
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    expected = parent.split(",")[1].strip() if parent else "1"
    assert process_env(cfg, "gen0") == {"CUDA_VISIBLE_DEVICES": expected}
    count, uuid = run(process_env(cfg, "gen0"))
    assert count == "1"
    assert uuid == str(torch.cuda.get_device_properties(1).uuid)
    count, uuid = run(process_env(cfg, "trainer@node0"))
    assert (count, uuid) == ("1", str(torch.cuda.get_device_properties(0).uuid))
