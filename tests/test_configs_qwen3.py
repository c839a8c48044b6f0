"""The four Qwen3 math configs (configs/qwen3-{0.6b,1.7b,4b,8b}-math.yaml): each loads, names
public hub datasets with the chat template and an AIME-style evaluation set, keeps the paper's
batch shape and follows the configs' learning-rate rule, and `scalerl plan` plans it offline
(HF_HUB_OFFLINE=1, an empty hub cache: the shapes come from KNOWN_CONFIGS) without a warning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from scalerl.config import load_config
from scalerl.placement import GIB, KNOWN_CONFIGS

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SIZES = ["0.6b", "1.7b", "4b", "8b"]


def path(size: str) -> Path:
    return ROOT / "configs" / f"qwen3-{size}-math.yaml"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    (tmp_path / "hf" / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("size", SIZES)
def test_config_names_hub_data_the_chat_template_and_an_aime_set(size):
    cfg = load_config(path(size))
    assert cfg.model.name_or_path == f"Qwen/Qwen3-{size.upper()}"
    d = cfg.data
    assert d.source.startswith("hf:") and d.task == "math"
    assert d.chat_template == "auto" and d.enable_thinking is True
    assert "\\boxed{}" in d.system_prompt
    sets = {s.name: s for s in cfg.evaluation.sets}
    assert sets["aime24"].source == "hf:HuggingFaceH4/aime_2024"
    assert sets["aime24"].samples_per_prompt in (16, 32)
    assert {"mean", "pass"} <= {kind for kind, _ in sets["aime24"].metric_ks()}
    assert sets["math500"].source == "hf:HuggingFaceH4/MATH-500"
    assert cfg.evaluation.fit_set in cfg.evaluation.set_names(d.num_eval_prompts)


@pytest.mark.parametrize("size", SIZES)
def test_config_keeps_the_paper_recipe_and_scales_lr_by_width(size):
    cfg = load_config(path(size))
    assert cfg.generation.prompts_per_batch * cfg.generation.samples_per_prompt == 768
    assert cfg.algorithm.loss.type == "cispo" and cfg.algorithm.loss.eps_max == 4.0
    assert cfg.pipeline.max_off_policy_steps == 8 and cfg.algorithm.fp32_lm_head
    assert cfg.optimizer.eps == 1e-15 and cfg.optimizer.weight_decay == 0.01
    # the rule each header states: the paper's 8B lr 5e-7 x sqrt(4096 / hidden size), 2 digits
    hidden = KNOWN_CONFIGS[cfg.model.name_or_path]["hidden_size"]
    assert cfg.optimizer.lr == pytest.approx(5e-7 * math.sqrt(4096 / hidden), rel=0.02)
    # the interruption window keeps the paper's proportions of the thinking budget (10k-12k of
    # 12,288) within a few points
    lc, gen = cfg.length_control, cfg.generation
    thinking = gen.max_new_tokens - lc.answer_budget
    assert 0.78 <= lc.thinking_budget_min / thinking <= 0.84
    assert 0.95 <= lc.thinking_budget_max / thinking <= 0.99


@pytest.mark.parametrize("size", SIZES)
def test_scalerl_plan_works_offline_without_a_warning(size, offline):
    result = runner.invoke(app, ["plan", str(path(size)), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    cfg = load_config(path(size))
    assert plan["accelerator"] == "cuda" and plan["warnings"] == []
    assert plan["max_num_seqs"] == cfg.generation.max_batch_size  # nothing clamped
    device = cfg.placement.device_memory_gib * GIB
    for proc in plan["processes"]:
        assert proc["memory_total"] <= device, proc["name"]
    roles = [p["role"] for p in plan["processes"]]
    assert roles.count("generator") == cfg.generation.num_generators
    used = {d for p in plan["processes"] for d in p["devices"]}
    assert used == set(range(cfg.placement.devices_per_node))  # every GPU of the node has a job
