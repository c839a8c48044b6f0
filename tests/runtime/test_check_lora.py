"""runtime/common.py check_lora on a hub id: the snapshot at model.revision in the local
Hugging Face cache is what gets checked (no network); a hub id not cached is left to prepare."""

from __future__ import annotations

import shutil

import pytest

from runtime.common import check_lora
from scalerl.config import load_config
from scalerl.lora import LoraError
from scalerl.models import build_tiny_model


def _cache_with(tmp_path, repo: str, revision: str):
    """A hub cache holding `repo` at `revision` (a branch name pointing at one snapshot)."""
    cache = tmp_path / "hub"
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "a" * 40
    build_tiny_model(tmp_path / "tiny", seed=0)
    shutil.copytree(tmp_path / "tiny", folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / revision).write_text(commit)
    return cache


def test_a_cached_hub_model_is_checked_at_its_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(_cache_with(tmp_path, "acme/tiny", "rl")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def cfg(*extra):
        return load_config(
            preset="tiny-cpu",
            overrides=["model.name_or_path=acme/tiny", "model.lora.rank=4", *extra],
        )

    check_lora(cfg("model.revision=rl"))  # default targets: all in the model
    with pytest.raises(LoraError, match="names no module of acme/tiny"):
        check_lora(cfg("model.revision=rl", "model.lora.target_modules=[c_attn]"))
    # another revision, not in the cache: nothing to check here (prepare_run loads it)
    check_lora(cfg("model.revision=main", "model.lora.target_modules=[c_attn]"))
