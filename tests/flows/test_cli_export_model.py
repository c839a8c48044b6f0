"""`scalerl runs export-model`: a weights version as a Hugging Face folder that transformers
loads and that generates, greedily, what the run's generator generates at that version (the
transformers engine, started on version 0 and updated in flight to the exported version)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from storage import open_store

WARM = Path(__file__).resolve().parents[2] / "scalerl" / "assets" / "tiny-warm"
PROMPTS = [f"{a}+{b}=" for a, b in ((3, 4), (12, 7), (25, 25), (99, 1), (8, 8), (40, 2), (7, 70), (5, 0))]  # fmt: skip


def _hf_folder(src: Path, dst: Path, *, noise_seed: int | None) -> Path:
    """The shipped tiny model as save_pretrained writes it; with noise_seed, every parameter
    moved by seeded noise (a stand-in for trained weights: different greedy completions)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if noise_seed is not None:
        gen = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.abs().mean())
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture
def run(tmp_path):
    root = tmp_path / "runs"
    run = open_store(str(root)).run("r1", create=True)
    run.write_config(
        {
            "model": {"name_or_path": "builtin:tiny-warm"},
            "algorithm": {
                "loss": {"type": "cispo"},
                "aggregation": "prompt",
                "advantage_normalization": "batch",
            },
            "pipeline": {"max_off_policy_steps": 8},
            "generation": {"samples_per_prompt": 8},
            "data": {"source": "synthetic:arithmetic-easy"},
        }  # fmt: skip
    )
    run.publish_weights(0, _hf_folder(WARM, tmp_path / "v0", noise_seed=None))
    run.publish_weights(3, _hf_folder(WARM, tmp_path / "v3", noise_seed=1))
    for version, rate in ((0, 0.25), (2, 0.375)):
        run.append_metrics(
            "eval",
            [{"step": version, "version": version, "pass_rate": rate, "pass_rate_se": 0.0625,
              "prompts": 8, "samples": 64}],
        )  # fmt: skip
    return root, run


def export(root: Path, *args: str):
    return CliRunner().invoke(app, ["runs", "export-model", "r1", "--storage", str(root), *args])


def test_the_export_loads_and_generates_what_the_generator_generates(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scalerl.engines.base import GroupRequest, SamplingSettings
    from scalerl.engines.hf import TransformersEngine

    root, store_run = run
    out = tmp_path / "exported"
    result = export(root, "-o", str(out))  # the newest version: 3
    assert result.exit_code == 0, result.output
    assert "weights version 3" in result.output
    facts = json.loads((out / "scalerl_export.json").read_text())
    assert facts["run_id"] == "r1" and facts["version"] == 3
    assert facts["evaluation"]["version"] == 2 and facts["evaluation"]["exact"] is False
    card = (out / "README.md").read_text()
    assert "r1 at weights version 3" in card
    assert "0.3750 ± 0.0625" in card and "the last evaluated before 3" in card
    assert "| loss | cispo |" in card
    assert not list(tmp_path.glob(".exported.partial-*"))

    # the generator at version 3: started on version 0, updated in flight (greedy decoding)
    engine = TransformersEngine(str(tmp_path / "v0"), max_batch_size=8)
    engine.load_weights(3, store_run.download_weights(3, tmp_path / "gen-v3"))
    settings = SamplingSettings(max_new_tokens=12, temperature=0.0)
    requests = [GroupRequest(f"p{i}", p, 1) for i, p in enumerate(PROMPTS)]
    generated = {c.prompt_id: c for group in engine.generate(requests, settings) for c in group}
    engine.close()

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    differs_from_v0 = 0
    v0 = AutoModelForCausalLM.from_pretrained(tmp_path / "v0", dtype=torch.float32)
    for i in range(len(PROMPTS)):
        c = generated[f"p{i}"]
        ids = torch.tensor([c.prompt_token_ids])
        kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        new = model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
        assert new[: len(c.token_ids)] == c.token_ids, PROMPTS[i]
        differs_from_v0 += v0.generate(ids, **kwargs)[0, ids.shape[1] :].tolist() != new
    assert differs_from_v0  # version 3 is not version 0: the comparison can tell them apart


def test_bad_exports_are_one_line_and_leave_nothing_behind(run, tmp_path):
    root, store_run = run
    out = tmp_path / "out"
    result = export(root, "-o", str(out), "--version", "7")
    assert result.exit_code == 2
    assert "has no weights version 7" in result.output and "(0, 3)" in result.output
    assert "Fix:" in result.output and not out.exists()

    inside = root / "r1" / "exported"
    result = export(root, "-o", str(inside))
    assert result.exit_code == 2 and "inside run r1's directory" in result.output
    assert not inside.exists()

    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = export(root, "-o", str(out))
    assert (
        result.exit_code == 2 and "is not empty" in result.output and "--overwrite" in result.output
    )
    assert (out / "mine.txt").read_text() == "keep"

    # bit rot in the stored version (same size): refused by its sha256, nothing written
    stored = root / "r1" / "weights" / "v3" / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    stored.write_bytes(bytes(data))
    fresh = tmp_path / "fresh"
    result = export(root, "-o", str(fresh))
    assert result.exit_code == 2 and "sha256" in result.output, result.output
    assert not fresh.exists() and not list(tmp_path.glob(".fresh.partial-*"))

    # --overwrite replaces a folder with a whole export of a sound version
    result = export(root, "-o", str(out), "--version", "0", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()
    assert "Not evaluated" not in (out / "README.md").read_text()  # v0 was evaluated
    shutil.rmtree(out)
