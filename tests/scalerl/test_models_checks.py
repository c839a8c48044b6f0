"""A model directory whose parts disagree is refused before a run writes anything, with one line
naming the numbers and the fix (scalerl/models.py check_model, scalerl/prompts.py
check_context_fits, through the CLI's input check): config.json against the weights' shapes
(read from the safetensors header, nothing loaded), and the model's positions against
generation.max_prompt_tokens + max_new_tokens. Real model directories (copies of the shipped
scalerl/assets/tiny-warm), the real CLI."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from scalerl.models import build_tiny_model, tiny_vocab
from scalerl.prompts import BUILTIN_MAX_POSITIONS, model_positions

ASSET = Path(__file__).resolve().parents[2] / "scalerl" / "assets" / "tiny-warm"
PROMPT_TOKENS = 32  # tiny-cpu's generation.max_prompt_tokens


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # past the checks: fails
    return CliRunner()


def _copy(tmp_path: Path, name: str, **config_changes) -> Path:
    model = Path(shutil.copytree(ASSET, tmp_path / name))
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg | config_changes))
    return model


def _refused(cli, tmp_path: Path, *overrides: str) -> str:
    """`scalerl run` with the overrides: exit 2, one error line, and no run store written."""
    root = tmp_path / "runs"
    args = ["run", "--preset", "tiny-cpu", "--storage", str(root)]
    for o in overrides:
        args += ["--set", o]
    result = cli.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not root.exists() and result.stdout == ""  # nothing written
    return lines[0]


def test_config_vocab_size_against_the_weights_rows_is_refused_before_anything_is_written(
    cli, tmp_path
):
    asset = json.loads((ASSET / "config.json").read_text())
    rows, width = len(tiny_vocab()), asset["hidden_size"]  # 4 special tokens + 256 bytes
    model = _copy(tmp_path, "vocab100", vocab_size=100)
    line = _refused(cli, tmp_path, f"model.name_or_path={model}")
    assert line == (
        f"error: the weights of {model} do not fit its config.json: model.embed_tokens.weight "
        f"is [{rows}, {width}] in model.safetensors but config.json (vocab_size 100, hidden_size "
        f"{width}, intermediate_size {asset['intermediate_size']}, num_hidden_layers "
        f"{asset['num_hidden_layers']}) makes it [100, {width}] (1 tensor(s) differ). Fix: use "
        "the config.json saved with these weights (model.save_pretrained(path) writes both), "
        "or weights saved from this config."
    )


def test_a_wider_config_than_the_weights_names_every_differing_tensor_count(cli, tmp_path):
    asset = json.loads((ASSET / "config.json").read_text())
    model = _copy(tmp_path, "wide", intermediate_size=2 * asset["intermediate_size"])
    line = _refused(cli, tmp_path, f"model.name_or_path={model}")
    # gate, up and down projections of every layer
    assert f"({3 * asset['num_hidden_layers']} tensor(s) differ)" in line, line
    h, i = asset["hidden_size"], asset["intermediate_size"]  # the first in the header's order
    assert f"model.layers.0.mlp.down_proj.weight is [{h}, {i}] in model.safetensors" in line
    assert f"makes it [{h}, {2 * i}]" in line, line


@pytest.mark.parametrize("name", ["builtin:tiny", "builtin:tiny-warm", "local"])
def test_more_tokens_than_the_model_has_positions_is_refused(cli, tmp_path, name):
    new_tokens = 100_000
    positions = 4096  # build_tiny_model's, and the shipped tiny-warm's config.json
    if name == "local":
        name = str(_copy(tmp_path, "m"))
        where = "max_position_embeddings in its config.json"
    else:
        where = "the builtin tiny models' max_position_embeddings"
    line = _refused(
        cli, tmp_path, f"model.name_or_path={name}", f"generation.max_new_tokens={new_tokens}"
    )
    assert line == (
        f"error: generation.max_prompt_tokens + generation.max_new_tokens = {PROMPT_TOKENS} + "
        f"{new_tokens:,} = {PROMPT_TOKENS + new_tokens:,} tokens, but model {name} has "
        f"{positions:,} positions ({where}), so completions would be cut at the end of its "
        f"context. Fix: lower generation.max_new_tokens to at most {positions - PROMPT_TOKENS:,} "
        f"({positions:,} - {PROMPT_TOKENS}), or use a model with a longer context."
    )


def test_exactly_the_models_positions_is_accepted(cli, tmp_path):
    result = cli.invoke(
        app,
        [
            "config", "validate", "--preset", "tiny-cpu",
            "--set", f"generation.max_new_tokens={BUILTIN_MAX_POSITIONS - PROMPT_TOKENS}",
            "--set", f"storage.url={tmp_path / 'runs'}",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_the_builtin_positions_are_the_tiny_models(tmp_path):
    default = inspect.signature(build_tiny_model).parameters["max_position_embeddings"].default
    shipped = json.loads((ASSET / "config.json").read_text())["max_position_embeddings"]
    assert BUILTIN_MAX_POSITIONS == default == shipped


def test_positions_from_gpt2_style_and_rope_scaled_configs():
    assert model_positions({"n_positions": 1024}) == (1024, "n_positions")
    yarn = {"factor": 4.0, "original_max_position_embeddings": 32768, "rope_type": "yarn"}
    scaled = model_positions({"max_position_embeddings": 40960, "rope_scaling": yarn})
    assert scaled == (4 * 32768, "max_position_embeddings with RoPE scaling factor 4.0")
    assert model_positions({"max_position_embeddings": 40960, "rope_scaling": None}) == (
        40960,
        "max_position_embeddings",
    )
    assert model_positions({}) == (None, "")
