"""`scalerl runs export-model` on a LoRA run (model.lora): the version's adapter merged into the
base model, which transformers loads without peft and which generates, greedily, what the
run's generator generates at that version (the transformers engine on version 0, the base,
taking the version's adapter in place); with --adapter-only, the adapter alone, which peft
loads on the base to the same completions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from scalerl.config import LoraConfig
from scalerl.lora import ADAPTER_DIR, initial_adapter, save_adapter
from storage import open_store

WARM = Path(__file__).resolve().parents[2] / "scalerl" / "assets" / "tiny-warm"
PROMPTS = [f"{a}+{b}=" for a, b in ((3, 4), (12, 7), (25, 25), (99, 1), (8, 8), (40, 2), (7, 70), (5, 0))]  # fmt: skip
LORA = LoraConfig(rank=4, alpha=8.0)


def _base(dst: Path) -> Path:
    """The shipped tiny model as save_pretrained writes it, with version 0's adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(WARM, dtype=torch.float32).save_pretrained(dst)
    AutoTokenizer.from_pretrained(WARM).save_pretrained(dst)
    save_adapter(dst / ADAPTER_DIR, initial_adapter(dst, LORA, seed=0), LORA)
    return dst


def _trained(base: Path, dst: Path, seed: int) -> Path:
    """An adapter-only version: version 0's A and a seeded random B (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        k: torch.randn(v.shape, generator=g) * 0.3 if ".lora_B." in k else v
        for k, v in initial_adapter(base, LORA, seed=0).items()
    }
    save_adapter(dst / ADAPTER_DIR, tensors, LORA)
    return dst


@pytest.fixture
def run(tmp_path):
    root = tmp_path / "runs"
    run = open_store(str(root)).run("r1", create=True)
    run.write_config(
        {
            "model": {
                "name_or_path": "builtin:tiny-warm",
                "dtype": "float32",
                "lora": LORA.model_dump(),
            },
            "algorithm": {"loss": {"type": "cispo"}},
            "data": {"source": "synthetic:arithmetic-easy"},
        }  # fmt: skip
    )
    base = _base(tmp_path / "v0")
    run.publish_weights(0, base)
    run.publish_weights(3, _trained(base, tmp_path / "v3", seed=1))
    return root, run


def export(root: Path, *args: str):
    return CliRunner().invoke(app, ["runs", "export-model", "r1", "--storage", str(root), *args])


def _greedy(model, ids) -> list[int]:
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_merged_and_adapter_exports_generate_what_the_generator_generates(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from scalerl.engines.base import GroupRequest, SamplingSettings
    from scalerl.engines.hf import TransformersEngine

    root, store_run = run
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    result = export(root, "-o", str(merged))
    assert result.exit_code == 0, result.output
    result = export(root, "-o", str(adapter), "--adapter-only")
    assert result.exit_code == 0, result.output

    # the merged folder is a plain model: no adapter files, loadable without peft
    assert not (merged / "adapter_config.json").exists() and not (merged / ADAPTER_DIR).exists()
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    facts = json.loads((merged / "scalerl_export.json").read_text())
    assert facts["weights"] == "merged" and facts["lora"]["rank"] == 4
    assert "merged here into the base model" in (merged / "README.md").read_text()
    # the adapter folder: peft's files only (and the tokenizer), naming the run's base model
    names = sorted(p.name for p in adapter.iterdir())
    assert names == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "scalerl_export.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "builtin:tiny-warm" and config["r"] == 4

    # the generator at version 3: the base, then version 3's adapter in place (greedy)
    engine = TransformersEngine(str(tmp_path / "v0"), max_batch_size=8)
    engine.load_weights(0, tmp_path / "v0")
    engine.load_weights(3, store_run.download_weights(3, tmp_path / "gen-v3"))
    settings = SamplingSettings(max_new_tokens=12, temperature=0.0)
    requests = [GroupRequest(f"p{i}", p, 1) for i, p in enumerate(PROMPTS)]
    generated = {c.prompt_id: c for group in engine.generate(requests, settings) for c in group}
    engine.close()

    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "v0", dtype=torch.float32)
    base_greedy = {
        i: _greedy(base, torch.tensor([generated[f"p{i}"].prompt_token_ids])) for i in range(8)
    }
    with_peft = PeftModel.from_pretrained(base, adapter)  # wraps `base` in place: after the above
    differs_from_base = 0
    for i in range(len(PROMPTS)):
        c = generated[f"p{i}"]
        ids = torch.tensor([c.prompt_token_ids])
        assert _greedy(plain, ids)[: len(c.token_ids)] == c.token_ids, PROMPTS[i]
        assert _greedy(with_peft, ids)[: len(c.token_ids)] == c.token_ids, PROMPTS[i]
        differs_from_base += base_greedy[i][: len(c.token_ids)] != c.token_ids
    assert differs_from_base  # the adapter changes completions: the comparison can tell


def test_adapter_only_of_version_zero_is_the_initial_adapter(run, tmp_path):
    """Version 0's adapter lives beside the base: the adapter-only export takes it (and the
    tokenizer), not the base's weights."""
    from safetensors.torch import load_file

    root, _ = run
    out = tmp_path / "a0"
    result = export(root, "-o", str(out), "--adapter-only", "--version", "0")
    assert result.exit_code == 0, result.output
    assert not (out / "model.safetensors").exists()
    tensors = load_file(str(out / "adapter_model.safetensors"))
    expected = initial_adapter(tmp_path / "v0", LORA, seed=0)
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)


def test_adapter_only_on_a_full_weight_run_is_one_line(tmp_path):
    root = tmp_path / "runs"
    run = open_store(str(root)).run("r1", create=True)
    run.write_config({"model": {"name_or_path": "builtin:tiny-warm"}})
    result = export(root, "-o", str(tmp_path / "out"), "--adapter-only")
    assert result.exit_code == 2
    assert (
        "trained full weights" in result.output and "Fix: leave out --adapter-only" in result.output
    )
    assert not (tmp_path / "out").exists()
