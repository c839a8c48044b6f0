"""Rewards: answer extraction, math-verify in workers, synthetic tasks, adversarial input."""

import itertools
import json
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from scalerl.rewards import (
    ArithmeticScorer,
    CountdownScorer,
    MathScorer,
    Reward,
    Scorer,
    ScoringPool,
    extract_final_answer,
    get_scorer,
    make_arithmetic,
    make_countdown,
    score_many,
)
from scalerl.rewards.expr import ExprError, safe_eval


@pytest.fixture(scope="module")
def pool():
    with ScoringPool(workers=2) as p:
        yield p


def math_row(answer):
    return {"prompt": "q", "answer": answer, "task": "math"}


# --------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so the result is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last box, nested braces
        ("\\boxed{\\frac{a}{b}} and a broken \\boxed{3", "\\frac{a}{b}"),  # unbalanced skipped
        ("<think>maybe \\boxed{7}</think>The answer is 8", "8"),  # after </think>
        ("<think>a</think>x<think>b</think> Answer: $x^2$.", "x^2"),  # after the LAST </think>
        ("<think>never closed \\boxed{5}", None),  # reasoning cut off: no answer section
        ("We get 3 apples and 12 pears", "12"),  # last number
        ("Final answer: 1,000", "1,000"),
        ("nothing numeric here", None),
        ("", None),
    ],
)
def test_extract_final_answer(completion, expected):
    assert extract_final_answer(completion) == expected


def test_extract_is_linear_on_pathological_braces():
    start = time.monotonic()
    assert extract_final_answer("\\boxed{" * 100_000) is None
    assert extract_final_answer("{" * 500_000 + "}" * 500_000) is None
    assert time.monotonic() - start < 2.0


# --------------------------------------------------------------------------- math
@pytest.mark.parametrize(
    ("answer", "completion", "passed"),
    [
        ("\\frac{1}{2}", "The answer is \\boxed{0.5}", True),
        ("\\frac{1}{2}", "<think>1/3?</think> \\boxed{1/2}", True),
        ("1000", "Answer: 1,000", True),
        ("x^2+1", "\\boxed{1+x^2}", True),
        ("\\sqrt{2}", "\\boxed{\\sqrt2}", True),
        ("42", "\\boxed{43}", False),
        (
            "42",
            "<think>it is \\boxed{42}</think> \\boxed{41}",
            False,
        ),  # the thinking is not the answer
        ("42", "<think>\\boxed{42} ... (cut off)", False),
    ],
)
def test_math_scorer(pool, answer, completion, passed):
    reward = MathScorer(pool=pool).score(math_row(answer), completion)
    assert reward.passed is passed
    assert reward.value == (1.0 if passed else 0.0)
    assert reward.reason == "correct" if passed else reward.reason != "correct"


def test_math_scorer_from_threads(pool):
    scorer = MathScorer(pool=pool)
    row = math_row("\\frac{3}{4}")
    seen = []
    thread = threading.Thread(target=lambda: seen.append(scorer.score(row, "\\boxed{0.75}")))
    thread.start()
    thread.join(timeout=60)
    assert seen == [Reward(1.0, True, "correct")]
    completions = ["\\boxed{3/4}", "\\boxed{0.7}", "Answer: 0.75", "junk"] * 3
    with ThreadPoolExecutor(max_workers=4) as ex:
        got = list(ex.map(lambda c: scorer.score(row, c).passed, completions))
    assert got == [True, False, True, False] * 3


def test_default_pool_from_a_thread():
    # score_many without pool= uses the shared default pool; called off the main thread.
    out = []
    thread = threading.Thread(
        target=lambda: out.extend(score_many([math_row("2")], ["\\boxed{2}"], workers=1))
    )
    thread.start()
    thread.join(timeout=60)
    assert out == [Reward(1.0, True, "correct")]


ADVERSARIAL = [
    "9**9**9**9",
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{10^{(10^{100})}}",
    "Answer: 10^(10^100)",
    "(" * 100_000,
    "\\boxed{" + "(" * 100_000 + "}",
    "x" * 2_000_000,
    "7" * 1_000_000,
    "\x00" * 1000 + "\\boxed{\x00}",
    "\udcff\ud800 \ufffd\x7f\x1b[31m junk \\boxed{\u202e\x00}",
    "\\boxed{}" * 50_000,
    "}" * 100_000 + "\\boxed{{{{",
]


@pytest.mark.parametrize("task", ["math", "arithmetic", "countdown"])
def test_adversarial_completions_score_zero_fast(pool, task):
    row = {
        "math": math_row("12"),
        "arithmetic": {"prompt": "3*4=", "answer": "12", "task": "arithmetic"},
        "countdown": {
            "prompt": "Make 12 with 3 4:",
            "answer": json.dumps({"target": 12, "numbers": [3, 4]}),
            "task": "countdown",
        },
    }[task]
    start = time.monotonic()
    rewards = score_many([row] * len(ADVERSARIAL), ADVERSARIAL, timeout_s=2.0, pool=pool)
    elapsed = time.monotonic() - start
    assert all(r == Reward(0.0, False, r.reason) and r.reason for r in rewards), rewards
    # Reasons land in Parquet and logs: printable, valid UTF-8, short.
    assert all(r.reason.isprintable() and len(r.reason) <= 200 for r in rewards)
    assert all(r.reason.encode("utf-8") for r in rewards)
    # Two workers, 2 s per item at most, plus restarts of killed workers.
    assert elapsed < 20.0, elapsed
    # The pool survives: a normal item right after still scores.
    ok = score_many([row], ["\\boxed{12}" if task != "countdown" else "3*4"], pool=pool)
    assert ok[0].passed


def test_runaway_verification_is_cut_off_as_timeout(pool):
    start = time.monotonic()
    (reward,) = score_many([math_row("1")], ["\\boxed{10^{(10^{100})}}"], timeout_s=1.0, pool=pool)
    assert reward.reason.startswith("timeout")
    assert not reward.passed
    assert time.monotonic() - start < 10.0


def test_pool_replaces_hung_and_crashed_workers():
    with ScoringPool(workers=2) as pool:
        out = pool.run(time.sleep, [(60,), (0,)], timeout_s=1.0)
        assert out[0].failure == "timeout" and out[1].ok
        crashed = pool.run(os._exit, [(3,)], timeout_s=5.0)
        assert crashed[0].failure == "crash" and "code 3" in crashed[0].detail
        errors = pool.run(int, [("not a number",)], timeout_s=5.0)
        assert errors[0].failure == "error" and "ValueError" in errors[0].detail
        assert [o.value for o in pool.run(abs, [(-1,), (-2,), (-3,)], timeout_s=5.0)] == [1, 2, 3]
    assert pool.closed
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(abs, [(1,)], timeout_s=1.0)


def _sleep_or_exit(x: float) -> float:
    """time.sleep(x) for x >= 0; exit the worker with code 7 for a negative x."""
    if x < 0:
        os._exit(7)
    time.sleep(x)
    return x


def test_hung_and_crashing_items_inside_a_chunk_fail_alone():
    # 40 items over 2 workers go out several per message (MAX_CHUNK); a hang and a crash
    # in the middle of a chunk fail only their own item, and every other item still runs
    # once, in order of the results.
    from scalerl.rewards import sandbox

    items = [(0.0,)] * 40
    items[5], items[22] = (60.0,), (-1.0,)
    with ScoringPool(workers=2) as pool:
        assert pool._chunk(deque(range(40))) > 1  # several items per message
        start = time.monotonic()
        out = pool.run(_sleep_or_exit, items, timeout_s=1.0)
        elapsed = time.monotonic() - start
    assert out[5].failure == "timeout"
    assert out[22].failure == "crash" and "code 7" in out[22].detail
    assert all(o.ok and o.value == 0.0 for i, o in enumerate(out) if i not in (5, 22))
    assert elapsed < 15.0, elapsed  # one 1 s deadline plus restarts, not 60 s
    assert sandbox.MAX_CHUNK >= 2


# ---------------------------------------------------------------------- arithmetic
def test_make_arithmetic_is_deterministic_and_correct():
    rows = make_arithmetic(200, seed=3)
    assert rows == make_arithmetic(200, seed=3)
    assert rows != make_arithmetic(200, seed=4)
    assert len({r["prompt"] for r in rows}) == 200
    for row in rows:
        assert row["task"] == "arithmetic" and row["prompt"].isascii()
        expr = row["prompt"]
        assert re.fullmatch(r"\d{2,3}([+*-]\d{2,3}){1,2}=", expr), expr
        # Independent check: Python's own precedence on a whitelisted expression.
        assert int(row["answer"]) == eval(expr[:-1], {"__builtins__": {}})  # noqa: S307
    assert {r["prompt_id"] for r in rows} == {f"arithmetic-3-{i:06d}" for i in range(200)}


@pytest.mark.parametrize(
    ("completion", "passed"),
    [
        ("5180", True),
        ("12+34*5=5180", True),
        ("\\boxed{5180}", True),
        ("5180.0", False),
        ("5181", False),
        ("", False),
        ("<think>5180", False),
        ("Answer: 5,180", False),
    ],
)
def test_arithmetic_scorer(completion, passed):
    row = {"prompt": "12*432+=", "answer": "5180", "task": "arithmetic"}
    assert ArithmeticScorer().score(row, completion).passed is passed


@pytest.mark.parametrize("answer", [142, 142.0, "142", "142.0", " 142.00 ", "1.42e2"])
def test_arithmetic_reference_may_be_an_integral_float(answer):
    """A Parquet file whose answers pandas wrote as floats (142.0) used to score every
    completion 0 ("invalid literal for int()"); an integral reference now reads as 142."""
    row = {"prompt": "100+42=", "answer": answer, "task": "arithmetic"}
    assert ArithmeticScorer().score(row, "142") == Reward(1.0, True, "correct")
    assert ArithmeticScorer().score(row, "143") == Reward(
        0.0, False, "wrong answer: got 143, expected 142"
    )
    assert ArithmeticScorer().score(row, "142.0").passed is False  # completions stay exact


def test_arithmetic_integral_float_reference_scores_through_the_pool(pool):
    rows = [{"prompt": "100+42=", "answer": "142.0", "task": "arithmetic"}] * 2
    got = score_many(rows, ["142", "141"], pool=pool)
    assert [r.passed for r in got] == [True, False]
    assert got[1].reason == "wrong answer: got 141, expected 142"


@pytest.mark.parametrize("answer", [142.5, "142.5", "abc", float("nan"), True, "1e999999"])
def test_arithmetic_reference_that_is_not_an_integer_is_named(answer):
    row = {"prompt": "q", "answer": answer, "task": "arithmetic"}
    with pytest.raises(ValueError) as info:
        ArithmeticScorer().score(row, "142")
    assert str(info.value) == (
        f"arithmetic row answer {str(answer)!r} is not an integer. Fix: give the exact integer "
        "value as the answer (e.g. 142; 142.0 is read as 142)."
    )


def test_a_scorer_exception_is_a_zero_reward_with_its_reason(pool):
    """What a verifier that raises becomes in score_many: reward 0, reason 'error: <type>: ...'
    (the reward_reason column of the scored shard)."""
    row = {"prompt": "q", "answer": "142.5", "task": "arithmetic"}
    (got,) = score_many([row], ["142"], pool=pool)
    assert (got.value, got.passed) == (0.0, False)
    assert got.reason.startswith("error: ValueError: arithmetic row answer '142.5' is not an")


# ----------------------------------------------------------------------- countdown
def _solvable(numbers, target):
    """Brute force over every expression tree using each number exactly once."""

    def values(nums):
        if len(nums) == 1:
            return {Fraction(nums[0])}
        out = set()
        for r in range(1, len(nums)):
            for left_idx in itertools.combinations(range(len(nums)), r):
                left = [nums[i] for i in left_idx]
                right = [nums[i] for i in range(len(nums)) if i not in left_idx]
                for a in values(left):
                    for b in values(right):
                        out |= {a + b, a - b, a * b}
                        if b != 0:
                            out.add(a / b)
        return out

    return Fraction(target) in values(list(numbers))


def test_make_countdown_is_deterministic_and_solvable():
    rows = make_countdown(30, seed=1)
    assert rows == make_countdown(30, seed=1)
    for row in rows:
        data = json.loads(row["answer"])
        assert row["task"] == "countdown" and row["prompt"].isascii()
        assert len(data["numbers"]) == 4 and all(1 <= x <= 50 for x in data["numbers"])
        assert 1 <= data["target"] <= 100
        assert row["prompt"] == f"Make {data['target']} with {' '.join(map(str, data['numbers']))}:"
        assert _solvable(data["numbers"], data["target"])


COUNTDOWN_ROW = {
    "prompt": "Make 24 with 4 6 8 2:",
    "answer": json.dumps({"target": 24, "numbers": [4, 6, 8, 2]}),
    "task": "countdown",
}


@pytest.mark.parametrize(
    ("completion", "passed", "reason"),
    [
        ("(8-4)*6/2*2", False, "uses numbers not given"),  # 2 used twice
        ("8*6/(4-2)", True, "correct"),
        ("<think>try 8*3</think>\n8*6/(4-2) = 24", True, "correct"),
        ("\\boxed{(6-2)*8-4-4}", False, "uses numbers not given"),
        ("4*6", False, "does not use every number"),
        ("8+6+4+2", False, "expression equals 20"),
        ("(8*6)/(4-2)+0*0", False, "uses numbers not given"),
        ("8**6/4/2", False, "invalid expression"),
        ("-8+6*4+2*4", False, "invalid expression"),  # unary minus (and 4 twice)
        ("8*6/(2-2)", False, "invalid expression"),  # division by zero
        ("__import__('os').system('true')", False, "invalid expression"),
        ("8.0*6/(4-2)", False, "invalid expression"),
        ("(" * 300 + "8" + ")" * 300, False, "invalid expression"),
    ],
)
def test_countdown_scorer(completion, passed, reason):
    reward = CountdownScorer().score(COUNTDOWN_ROW, completion)
    assert reward.passed is passed, reward
    assert reason in reward.reason


def test_countdown_at_most_once_mode():
    assert CountdownScorer(use_all=False).score(COUNTDOWN_ROW, "4*6").passed
    assert not CountdownScorer(use_all=False).score(COUNTDOWN_ROW, "4*6*1").passed


def test_safe_eval_limits():
    assert safe_eval("(50-25)*3") == 75
    assert safe_eval("7/2") == Fraction(7, 2)
    for bad in ["2**10", "1//2", "a+1", "1e3", "3 % 2", "1" * 300, "", "(1", "\x00"]:
        with pytest.raises(ExprError):
            safe_eval(bad)


# ----------------------------------------------------------------------- dispatch
def test_score_many_dispatches_and_keeps_order(pool):
    arith = make_arithmetic(6, seed=0)
    count = make_countdown(4, seed=0)
    rows = [*arith, *count, math_row("\\frac{1}{3}")]
    completions = [r["answer"] for r in arith[:3]] + ["0"] * 3
    completions += [json.loads(r["answer"])["solution"] for r in count] + ["\\boxed{2/6}"]
    got = [r.passed for r in score_many(rows, completions, pool=pool)]
    assert got == [True] * 3 + [False] * 3 + [True] * 4 + [True]


def test_score_many_bad_rows_raise_and_bad_completions_score_zero(pool):
    with pytest.raises(ValueError, match="2 rows and 1 completions"):
        score_many([math_row("1")] * 2, ["1"], pool=pool)
    with pytest.raises(ValueError, match="missing \\['answer'\\]"):
        score_many([{"prompt": "p", "task": "math"}], ["1"], pool=pool)
    with pytest.raises(ValueError, match="unknown reward task 'chess'.*arithmetic"):
        score_many([{"prompt": "p", "answer": "1", "task": "chess"}], ["1"], pool=pool)
    (reward,) = score_many([math_row("1")], [None], pool=pool)
    assert reward == Reward(0.0, False, "completion is NoneType, not text")
    with pytest.raises(ValueError, match="countdown"):
        get_scorer("Countdown")
    for task in ("math", "arithmetic", "countdown"):
        assert isinstance(get_scorer(task), Scorer) and get_scorer(task).name == task


def test_reward_workers_get_no_credentials(monkeypatch):
    """A verifier parses untrusted completions: its worker process must not hold cloud keys or
    API tokens. The worker's own os.environ is read back through os.getenv."""
    secrets = {
        "AWS_SECRET_ACCESS_KEY": "wJalr-SECRET-1234",
        "AWS_ACCESS_KEY_ID": "AKIA-TEST",
        "HF_TOKEN": "hf_secret",
        "PREFECT_API_AUTH_STRING": "admin:pass",
        "MY_DB_PASSWORD": "hunter2",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SCALERL_HARMLESS", "kept")
    with ScoringPool(workers=1) as pool:
        names = [*secrets, "SCALERL_HARMLESS"]
        out = pool.run(os.getenv, [(n,) for n in names], timeout_s=10.0)
    seen = dict(zip(names, (o.value for o in out), strict=True))
    assert all(seen[n] is None for n in secrets), seen
    assert seen["SCALERL_HARMLESS"] == "kept"
