"""The YAML presets under configs/: every one validates, and a GPU preset's loading path works on
the CPU with the tiny local model and a small JSONL file standing in for the hub model and data."""

import json
from pathlib import Path

import pytest

from scalerl.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert any(p.name == "qwen3-0.6b-math.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_validates(path):
    cfg = load_config(path)
    assert (
        cfg.completions_per_batch
        == cfg.generation.prompts_per_batch * cfg.generation.samples_per_prompt
    )


def test_qwen3_preset_is_the_paper_recipe_on_vllm():
    cfg = load_config("configs/qwen3-0.6b-math.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen3-0.6B"
    assert cfg.generation.engine == "vllm"
    assert cfg.data.task == "math" and cfg.data.source.startswith("hf:")
    assert cfg.algorithm.loss.type == "cispo" and cfg.algorithm.loss.eps_max == 4.0
    assert cfg.pipeline.max_off_policy_steps == 8
    assert cfg.completions_per_batch == 48 * 16
    total = cfg.generation.max_prompt_tokens + cfg.generation.max_new_tokens
    assert total == 8192


def test_qwen3_preset_loads_with_the_tiny_model_standing_in(tmp_path):
    import torch

    from scalerl.data import load_prompts
    from scalerl.models import build_tiny_model, load_policy

    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(12)]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model_dir = build_tiny_model(tmp_path / "tiny", seed=0)
    cfg = load_config(
        "configs/qwen3-0.6b-math.yaml",
        overrides=[
            f"model.name_or_path={model_dir}",
            "model.dtype=float32",
            f"data.source={data}",
            "data.prompt_column=prompt",
            "data.num_eval_prompts=4",
        ],
    )
    prompts = load_prompts(cfg.data)
    assert len(prompts.train) == 8 and len(prompts.eval) == 4
    assert {r["task"] for r in prompts.train + prompts.eval} == {"math"}
    by_prompt = {r["prompt"]: r["answer"] for r in rows}
    assert all(by_prompt[r["prompt"]] == r["answer"] for r in prompts.train + prompts.eval)
    model, tokenizer = load_policy(cfg.model.name_or_path, dtype=cfg.model.dtype)
    ids = tokenizer.encode(prompts.train[0]["prompt"], add_special_tokens=False)
    assert tokenizer.decode(ids) == prompts.train[0]["prompt"]
    logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)
