"""The supervised warm-start of the tiny model: deterministic, and it makes the model pass where
the random model does not (pass rates checked by the arithmetic scorer on held-out problems).
The shipped copy (scalerl/assets/tiny-warm) is the tiny-cpu preset's, checked by hash, and a
run uses it only when it never trained on the run's held-out prompts."""

import hashlib
import json
import re
import shutil
from dataclasses import asdict, replace

import pytest

import scalerl.warmstart
from scalerl.rewards.synthetic import ArithmeticScorer
from scalerl.warmstart import (
    MANIFEST,
    SHIPPED_DIR,
    ShippedWeightsError,
    WarmStartSpec,
    completion_text,
    sample_answers,
    shipped_for,
    training_rows,
    warm_start_tiny,
)

# For the determinism checks only: a few steps exercise every random choice just as well.
SHORT = WarmStartSpec(steps=5, batch_size=16, num_prompts=200)


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def held_out():
    """The tiny-cpu preset's held-out prompts: the shipped warm model never trained on them."""
    from scalerl.config import load_config
    from scalerl.data import load_prompts

    return load_prompts(load_config(preset="tiny-cpu").data).eval


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """The shipped warm model as a run gets it (config and tokenizer beside the weights)."""
    out = tmp_path_factory.mktemp("warm") / "m"
    shutil.copytree(SHIPPED_DIR, out, ignore=shutil.ignore_patterns(MANIFEST))
    return out


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = warm_start_tiny(tmp_path / "a", seed=0, spec=SHORT, exclude=["1+2="])
    b = warm_start_tiny(tmp_path / "b", seed=0, spec=SHORT, exclude=["1+2="])
    c = warm_start_tiny(tmp_path / "c", seed=1, spec=SHORT, exclude=["1+2="])
    assert _digest(a) == _digest(b)
    assert _digest(c) != _digest(a)


def test_warm_model_beats_the_random_one_on_the_scorer(tmp_path, warm, held_out):
    from scalerl.models import build_tiny_model, load_policy

    random_dir = build_tiny_model(tmp_path / "random", seed=0)
    scorer = ArithmeticScorer()
    rates = {}
    for name, path in (("random", random_dir), ("warm", warm)):
        model, tok = load_policy(str(path))
        outs = sample_answers(
            model, tok, [r["prompt"] for r in held_out], samples=1, temperature=0, seed=0
        )
        # pass rate written out: the share of completions equal to the exact integer answer
        # (what follows the thinking section, if any, is the answer)
        rates[name] = sum(
            o[0].rpartition("</think>")[2].strip() == r["answer"]
            for r, o in zip(held_out, outs, strict=True)
        ) / len(outs)
        scored = [scorer.score(r, o[0]).passed for r, o in zip(held_out, outs, strict=True)]
        assert sum(scored) / len(scored) == rates[name]
    assert rates["random"] == 0.0
    # the warm start's aim (scalerl/warmstart.py): the greedy answer is almost always right
    assert rates["warm"] >= 0.9, rates


def test_training_prompts_skip_the_excluded_ones():
    spec = WarmStartSpec(num_prompts=200)
    rows = training_rows(seed=0, spec=spec)
    excluded = [r["prompt"] for r in rows[:50]]
    kept = training_rows(seed=0, spec=spec, exclude=excluded)
    assert len(kept) == 150 and not {r["prompt"] for r in kept} & set(excluded)
    for r in kept:  # 2 operands, + or -: answer = a + b or a - b
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", r["prompt"]).groups()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_negative_steps_are_refused(tmp_path):
    with pytest.raises(ValueError, match="steps must be >= 0"):
        warm_start_tiny(tmp_path / "bad", spec=WarmStartSpec(steps=-1))


def test_completion_formats_are_read_by_the_scorer():
    scorer = ArithmeticScorer()
    for answer in ("579", "-579", "0"):
        row = {"prompt": "x=", "answer": answer, "task": "arithmetic"}
        assert completion_text(answer) == answer
        thought = completion_text(answer, reversed_thinking=True)
        # "<think>" + digits reversed (sign last) + "</think>" + the answer
        assert (
            thought
            == "<think>"
            + answer.lstrip("-")[::-1]
            + "-" * answer.startswith("-")
            + "</think>"
            + answer
        )
        assert scorer.score(row, thought).passed and scorer.score(row, answer).passed


def _manifest() -> dict:
    return json.loads((SHIPPED_DIR / MANIFEST).read_text())


def test_shipped_files_match_the_manifest_and_the_preset():
    """Every shipped file's sha256 (computed here) is the manifest's, and the manifest was
    built for the tiny-cpu preset: its seed, the default recipe, and exactly the preset's
    held-out prompts that the warm start would otherwise train on."""
    from scalerl.config import load_config
    from scalerl.data import load_prompts

    manifest = _manifest()
    files = sorted(p.name for p in SHIPPED_DIR.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == files
    for name in files:
        assert (
            hashlib.sha256((SHIPPED_DIR / name).read_bytes()).hexdigest()
            == (manifest["files"][name])
        )
    cfg = load_config(preset="tiny-cpu")
    assert cfg.model.name_or_path == "builtin:tiny-warm" and manifest["seed"] == cfg.data.seed
    assert manifest["spec"] == json.loads(json.dumps(asdict(WarmStartSpec())))
    trained_on = {r["prompt"] for r in training_rows(seed=cfg.data.seed, spec=WarmStartSpec())}
    held = {r["prompt"] for r in load_prompts(cfg.data).eval}
    assert manifest["excluded"] == sorted(trained_on & held)
    assert shipped_for(cfg.data.seed, WarmStartSpec(), sorted(trained_on & held)) == SHIPPED_DIR


def test_shipped_copy_is_used_only_when_it_never_saw_the_runs_held_out_prompts():
    manifest = _manifest()
    spec, excluded = WarmStartSpec(), manifest["excluded"]
    assert shipped_for(0, spec, excluded[:10]) == SHIPPED_DIR  # fewer to avoid: still fine
    assert shipped_for(0, spec, [*excluded, "98+97="]) is None  # trained on one of them
    assert shipped_for(1, spec, []) is None  # another seed: other training prompts
    assert shipped_for(0, replace(spec, steps=10), excluded) is None  # another recipe


def test_a_changed_shipped_file_is_refused_with_the_fix(tmp_path):
    copy = tmp_path / "tiny-warm"
    shutil.copytree(SHIPPED_DIR, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    excluded = _manifest()["excluded"]
    with pytest.raises(
        ShippedWeightsError,
        match=r"model.safetensors does not match its manifest.*Fix: restore it \(`git checkout",
    ):
        shipped_for(0, WarmStartSpec(), excluded, root=copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ShippedWeightsError, match="sha256 missing"):
        shipped_for(0, WarmStartSpec(), excluded, root=copy)


def test_a_run_gets_the_shipped_weights_without_training(tmp_path, monkeypatch):
    from runtime.common import materialize_base_model
    from scalerl.config import load_config

    def no_training(*args, **kwargs):
        raise AssertionError("the preset's run trained a warm model instead of the shipped one")

    monkeypatch.setattr(scalerl.warmstart, "warm_start_tiny", no_training)
    monkeypatch.setenv("SCALERL_CACHE", str(tmp_path / "empty-cache"))
    out = materialize_base_model(load_config(preset="tiny-cpu"), tmp_path / "v0")
    assert not (out / MANIFEST).exists() and not (tmp_path / "empty-cache").exists()
    for name, digest in _manifest()["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


def test_a_damaged_manifest_is_refused_with_the_fix(tmp_path):
    from scalerl.warmstart import read_manifest

    copy = tmp_path / "tiny-warm"
    shutil.copytree(SHIPPED_DIR, copy)
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(ShippedWeightsError, match="cannot be read.*Fix: restore it"):
        shipped_for(0, WarmStartSpec(), [], root=copy)
    (copy / MANIFEST).write_text(json.dumps({"seed": 0, "spec": {}}))
    with pytest.raises(ShippedWeightsError, match="lacks excluded, files.*Fix"):
        read_manifest(copy)
    assert read_manifest(tmp_path) is None  # no manifest: nothing shipped there


def test_ship_refuses_a_folder_that_is_not_a_shipped_model(tmp_path, capsys):
    from scalerl.warmstart import main

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["ship", "--out", str(tmp_path)])  # before any training
    assert exit_info.value.code == 2
    assert "no manifest.json: not a shipped warm model. Fix:" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
