"""A tokenizer that cannot encode the prompts' characters (here: the tiny tokenizer cut to its
first 60 tokens, which drops every byte from 56 on, '8', '9', '=' and letters among them) is
found where the prompts are rendered and counted (runtime/prompts.py prepare_prompts): more than
1% of a split lossy is refused before anything is written; fewer are counted in the log and the
run goes on. Real tokenizer files (copies of scalerl/assets/tiny-warm), real data files, the
real CLI; Qwen3's own tokenizer (NFC-normalising) passes its prompts."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from runtime.prompts import prepare_prompts
from scalerl.config import load_config
from scalerl.models import build_qwen3_model

ASSET = Path(__file__).resolve().parents[2] / "scalerl" / "assets" / "tiny-warm"
KEEP = 60  # tokens the cut tokenizer keeps
SPECIAL = 4  # the tiny vocabulary: 4 special tokens, then byte b is token SPECIAL + b


def _cut_model(tmp_path: Path) -> Path:
    model = Path(shutil.copytree(ASSET, tmp_path / "cut60"))
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k: i for k, i in tok["model"]["vocab"].items() if i < KEEP}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    return model


def _lossy(text: str) -> bool:
    """Whether the cut tokenizer loses a character of `text`: a byte without a token."""
    return any(SPECIAL + b >= KEEP for b in text.encode())


def _data(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
    return path


def held_out(n: int, seed: int) -> int:
    """The index of the one held-out row of n (scalerl/data.py: the first of a seeded shuffle)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[0]


def _cfg(tmp_path: Path, model: Path, data: Path):
    return [
        f"model.name_or_path={model}",
        f"data.source={data}",
        "data.task=arithmetic",
        f"data.num_train_prompts={len(data.read_text().splitlines()) - 1}",
        "data.num_eval_prompts=1",  # one held-out prompt, by a seeded shuffle (held_out)
        "length_control.enabled=false",
        f"storage.url={tmp_path / 'runs'}",
    ]


def test_a_tokenizer_missing_characters_is_refused_before_anything_is_written(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    model = _cut_model(tmp_path)
    prompts = [f"{a} + {b} = ?" for a in range(10) for b in range(10)]  # '=' and '?' are lost
    lossy = [p for p in prompts if _lossy(p)]
    assert len(lossy) == len(prompts)
    args = ["run", "--preset", "tiny-cpu"]
    for o in _cfg(tmp_path, model, _data(tmp_path, prompts)):
        args += ["--set", o]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    example = line.split("e.g. ", 1)[1].split(": the model", 1)[0]
    assert line == (
        f"error: {len(lossy) - 1} of the {len(prompts) - 1} prompts of split 'train' do not survive the "
        f"tokenizer of {model} (their tokens decode to other text), e.g. {example}: the model "
        "would see prompts with characters missing. Fix: use the tokenizer saved with this model "
        "(its vocabulary must cover every character of the data), or remove the prompts it "
        "cannot encode (at most 1% of a split may differ)."
    )
    # the example: a prompt, and what its ids decode to: shorter, without a byte past the cut
    shown, back = (t[1:-1] for t in example.split(": ", 1)[1].split(" comes back as "))
    assert shown in prompts and len(back) < len(shown) and not _lossy(back)
    assert not (tmp_path / "runs").exists() and result.stdout == ""


def test_one_lossy_prompt_in_a_hundred_is_logged_and_kept(tmp_path, caplog):
    model = _cut_model(tmp_path)
    prompts = [f"{a} + {b}" for a in range(8) for b in range(8)]  # every byte < 56: kept whole
    prompts += [f"{a} - {b}" for a in range(6) for b in range(6)] + ["0 - 7"]
    assert len(prompts) == 101 and not any(_lossy(p) for p in prompts)  # 100 train, 1 held out
    seed = load_config(preset="tiny-cpu").data.seed
    lossy_at = [i for i in range(len(prompts)) if i != held_out(len(prompts), seed)][-2:]
    prompts[lossy_at[-1]] = "7 - 9"  # '9' is byte 57: lost
    cfg = load_config(preset="tiny-cpu", overrides=_cfg(tmp_path, model, _data(tmp_path, prompts)))
    with caplog.at_level(logging.WARNING):
        prepared = prepare_prompts(cfg, check_only=True)
    assert len(prepared.train) == len(prompts) - 1  # the lossy one kept, not dropped
    (said,) = [r.getMessage() for r in caplog.records if "round trip" in r.getMessage()]
    assert said.startswith("prompts train: 1 of 100 do not survive the tokenizer's round trip")
    assert "'7 - 9' comes back as '7 - '" in said
    prompts[lossy_at[-2]] = "7 - 8"  # 2 of 100: over 1%
    cfg = load_config(preset="tiny-cpu", overrides=_cfg(tmp_path, model, _data(tmp_path, prompts)))
    with pytest.raises(ValueError, match=r"^2 of the 100 prompts of split 'train' do not"):
        prepare_prompts(cfg, check_only=True)


def test_qwen3_tokenizer_and_template_round_trip_unicode_prompts(tmp_path):
    """NFC-normalising Qwen3: composed/decomposed accents, ligatures, CJK, emoji, spaces."""
    model = build_qwen3_model(tmp_path / "qwen3", hidden_size=64, layers=1)
    prompts = [
        "Café costs 3€ — what is 2 + 2?",
        "e\u0301 and \u212b and ﬁ: 1 + 1 =",
        "  two  spaces\tand a tab: 3 - 1 =",
        "数学: 6 × 7 = ? 🙂",
    ]
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            *_cfg(tmp_path, model, _data(tmp_path, prompts)),
            "generation.max_prompt_tokens=256",
        ],
    )
    prepared = prepare_prompts(cfg, check_only=True)
    assert len(prepared.train) + len(prepared.splits["eval"]) == len(prompts)
