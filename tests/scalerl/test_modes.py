"""scalerl/modes.py through load_config, as `scalerl run` reads a config: weights.transport=nccl
with placement.colocate is refused when trainer rank 0 and a generator share a device (one NCCL
group cannot hold two ranks on one device), and accepted when every rank has its own."""

from __future__ import annotations

import pytest

from scalerl.config import ConfigError, load_config

NCCL_ON_CUDA = [
    "placement.accelerator=cuda",
    "placement.trainer_ranks=1",
    "generation.num_generators=1",
    "generation.engine=vllm",
    "weights.transport=nccl",
]


@pytest.mark.parametrize("devices", [1, 2])
def test_nccl_with_the_trainer_colocated_on_a_generators_device_is_refused(devices):
    # colocate starts the generators again from device 0, where trainer rank 0 is, on one GPU
    # and on two alike
    overrides = [*NCCL_ON_CUDA, f"placement.devices_per_node={devices}", "placement.colocate=true"]
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny-cpu", overrides=overrides)
    message = str(err.value)
    assert "trainer rank 0 and generator gen0 on device 0" in message
    assert "Fix: weights.transport=local" in message
    # the same machine with transport local is accepted
    local = [o for o in overrides if not o.startswith("weights.")] + ["weights.transport=local"]
    assert load_config(preset="tiny-cpu", overrides=local).placement.colocate


def test_nccl_with_a_device_per_rank_is_accepted():
    cfg = load_config(preset="tiny-cpu", overrides=[*NCCL_ON_CUDA, "placement.devices_per_node=2"])
    assert (cfg.weights.transport, cfg.placement.colocate) == ("nccl", False)
    # colocate with devices given apart: trainer rank 0 on 1, gen0 on 0, no device shared
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            *NCCL_ON_CUDA,
            "placement.devices_per_node=2",
            "placement.colocate=true",
            "placement.trainer_devices=[1]",
            "placement.generator_devices=[0]",
        ],
    )
    assert cfg.placement.colocate and cfg.placement.trainer_devices == [1]


def test_memory_shares_add_up_only_when_the_evaluation_shares_gen0s_device():
    """vLLM's evaluation engine beside gen0 takes evaluation.gpu_memory_utilization of the same
    device, so the two shares must stay within 0.95; on devices of its own
    (placement.evaluation_devices) it takes the generators' share and nothing adds up."""
    from scalerl.config import RunConfig

    shares = {"generation": {"engine": "vllm", "gpu_memory_utilization": 0.8, "num_generators": 1}}
    with pytest.raises(
        ValueError, match=r"0\.8 \+ evaluation\.gpu_memory_utilization = 0\.25 = 1\.05"
    ):
        RunConfig.model_validate(shares)
    own = {
        "accelerator": "cuda",
        "devices_per_node": 3,
        "trainer_ranks": 1,
        "evaluation_devices": [2],
    }
    cfg = RunConfig.model_validate({**shares, "placement": own})
    assert cfg.placement.evaluation_devices == [2]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["placement.trainer_ranks=2", "pipeline.isolation=process"], "sharding adapters"),
        ([*NCCL_ON_CUDA, "placement.devices_per_node=2"], "broadcasts full weights"),
    ],
    ids=["ranks", "nccl"],
)
def test_lora_with_modes_it_cannot_use_is_refused(extra, says):
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny-cpu", overrides=[*extra, "model.lora.rank=8"])
    assert says in str(err.value) and "Fix:" in str(err.value)
    load_config(preset="tiny-cpu", overrides=extra)  # the same without model.lora is accepted


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["model.lora.trained_modules=[norm]", "generation.engine=vllm"], "vLLM serves LoRA"),
        (["model.lora.trained_modules=[embed_tokens]"], "the LM head and the embedding"),
        (["model.lora.trained_modules=[q_proj]"], "both in target_modules and trained_modules"),
    ],
    ids=["vllm", "embedding", "both"],
)
def test_lora_trained_modules_that_cannot_work_are_refused(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny-cpu", overrides=["model.lora.rank=8", *overrides])
    assert says in str(err.value) and "Fix:" in str(err.value)


def test_lora_trained_modules_on_the_transformers_engine_are_accepted():
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            "model.lora.rank=8",
            "model.lora.trained_modules=[norm]",
            "generation.engine=transformers",
        ],
    )
    assert cfg.model.lora.trained_modules == ["norm"]
