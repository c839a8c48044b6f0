"""Shared fixtures for the engine tests: the tiny model and hand-made "scripted" weights.

Scripted weights make the next token a known function of the current token: every layer's
attention and MLP output projections are zeroed, so the final hidden state is the current
token's embedding, and the (tied) embedding rows are one-hot directions: an input token x
whose rule says "next is k" gets embedding d_k; a target token k gets 10 * d_k, so the
logit of k after x is about 10x any other (probability 1 up to e^-100).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from scalerl.models import build_tiny_model


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The tiny model's matmuls are far faster single-threaded, and CI machines are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("engine_models") / "tiny", seed=0)


def write_scripted_weights(base: Path, out: Path, rules: dict[int, int], default: int) -> Path:
    """Copy ``base`` to ``out`` with weights that predict rules.get(x, default) after x."""
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(str(base / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    assert config["tie_word_embeddings"]
    emb = tensors["model.embed_tokens.weight"]
    vocab, hidden = emb.shape
    targets = sorted({default, *rules.values()})
    assert len(targets) <= hidden and all(rules.get(t, default) == t for t in targets)
    direction = {t: i for i, t in enumerate(targets)}
    new = torch.zeros_like(emb)
    for x in range(vocab):
        new[x, direction[rules.get(x, default)]] = 1.0
    for t in targets:
        new[t, direction[t]] = 10.0
    tensors["model.embed_tokens.weight"] = new
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def scripted(tmp_path_factory, tiny_model):
    """Factory: scripted("name", rules, default) -> a checkpoint directory."""
    root = tmp_path_factory.mktemp("scripted")

    def make(name: str, rules: dict[int, int], default: int) -> Path:
        return write_scripted_weights(tiny_model, root / name, rules, default)

    return make


@pytest.fixture
def scheduled():
    """ScheduledWeights(version, path, at): a WeightSource publishing once, at poll ``at``."""
    return ScheduledWeights


class ScheduledWeights:
    """A WeightSource that publishes ``(version, path)`` once, at its ``at``-th poll."""

    def __init__(self, version: int, path: Path, at: int) -> None:
        self.version, self.path, self.at, self.polls = version, path, at, 0

    def poll(self):
        self.polls += 1
        return (self.version, self.path) if self.polls == self.at else None
