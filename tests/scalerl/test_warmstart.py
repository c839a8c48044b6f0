"""The supervised warm-start of the tiny model: deterministic, and it makes the model pass where
the random model does not (pass rates checked by the arithmetic scorer on held-out problems)."""

import hashlib
import re

import pytest

from scalerl.rewards.synthetic import ArithmeticScorer, make_arithmetic
from scalerl.warmstart import (
    WarmStartSpec,
    completion_text,
    sample_answers,
    training_rows,
    warm_start_tiny,
)

# Long enough that the model gets some held-out sums and differences right, short enough for a
# test. Float rounding differs between CPUs, so the result does too: at 500 steps one machine
# got 3 of 48 greedy answers right and another 1 of 48 (5 of 240); at 800 steps, 18 of 240.
SPEC = WarmStartSpec(steps=800, num_prompts=4_000)
# For the determinism checks only: a few steps exercise every random choice just as well.
SHORT = WarmStartSpec(steps=5, batch_size=16, num_prompts=200)


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def held_out():
    # The warm-start's own distribution (2 operands of 1-2 digits, + and -), another seed.
    return make_arithmetic(240, seed=99, digits=(1, 2), terms=(2, 2), ops="+-")


@pytest.fixture(scope="module")
def warm(tmp_path_factory, held_out):
    return warm_start_tiny(
        tmp_path_factory.mktemp("warm") / "m", seed=0, spec=SPEC,
        exclude=[r["prompt"] for r in held_out],
    )  # fmt: skip


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
    assert rates["warm"] >= 0.03, rates  # at least 8 of 240


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
