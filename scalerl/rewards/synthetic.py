"""Synthetic verifiable tasks for tests and the CPU demo: arithmetic and countdown.

Nothing can be downloaded here, so the pipeline trains on tasks it generates itself.
Prompts are short ASCII text meant for a tiny character-level model:

- arithmetic: ``"12+345*6="``; the answer is the exact integer value with the usual
  precedence (``*`` before ``+``/``-``), as a decimal string (``"2082"``).
- countdown: ``"Make 75 with 3 7 25 50:"``; the answer is JSON
  ``{"target": 75, "numbers": [3, 7, 25, 50], "solution": "(50-25)*3"}``. Every
  generated problem is solvable: the target is the value of a random expression over
  the numbers (the ``solution``, one of possibly many; the verifier ignores it).

Verifiers (exact):

- ``ArithmeticScorer``: the final answer (see ``base.extract_final_answer``) must be
  an integer literal (``-?digits``) equal to the reference. ``"2082.0"`` fails. The
  *reference* (``row["answer"]``) may be an int, or a float or decimal text with an
  integral value (``2082.0``, ``"2082.0"``: what pandas writes for an integer column that
  once held a null), read as that integer (``arithmetic_reference``); any other reference
  raises ValueError naming it and the fix (scalerl/data.py refuses such rows at load).
- ``CountdownScorer``: the final answer is taken by the same rule but with "last
  non-empty line" as the fallback; a trailing ``= <target>`` (or leading
  ``<target> =``) is dropped. What remains must be an expression of integer literals,
  ``+ - * /`` and parentheses (no unary minus, no ``**``), parsed and evaluated by
  the safe evaluator in expr.py; it must use each given number exactly once
  (``use_all=True``, the default, as in the classic game's RL versions) or at most once
  (``use_all=False``), and evaluate exactly to the target (division is exact, so
  intermediate fractions are allowed).

Generators are deterministic in their arguments (``random.Random(seed)``), return
distinct prompts, and name rows ``"{task}-{seed}-{index:06d}"``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from scalerl.rewards.base import (
    MAX_ANSWER_CHARS,
    Reward,
    correct,
    extract_final_answer,
    wrong,
)
from scalerl.rewards.expr import ExprError, evaluate, integer_literals, parse_expr, safe_eval

_INT_RE = re.compile(r"-?\d{1,64}")
_OPS = "+-*"


def make_arithmetic(
    n: int,
    *,
    seed: int,
    digits: tuple[int, int] = (2, 3),
    terms: tuple[int, int] = (2, 3),
    ops: str = "+-*",
) -> list[dict[str, str]]:
    """n distinct problems like ``"12+345*6="``: operands of digits[0]..digits[1] digits,
    terms[0]..terms[1] operands, operators drawn from ``ops`` (a subset of "+-*")."""
    lo_d, hi_d = _check_range("digits", digits, 1, 9)
    lo_t, hi_t = _check_range("terms", terms, 2, 8)
    if not ops or any(op not in _OPS for op in ops):
        raise ValueError(
            f"ops must be a non-empty subset of {_OPS!r}, got {ops!r}. Fix: ops='+-*'."
        )
    rng = random.Random(f"arithmetic:{seed}")

    def draw() -> tuple[str, str]:
        k = rng.randint(lo_t, hi_t)
        operands = [
            str(rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1))
            for d in (rng.randint(lo_d, hi_d) for _ in range(k))
        ]
        expr = operands[0] + "".join(rng.choice(ops) + x for x in operands[1:])
        value = safe_eval(expr)
        return expr + "=", str(value.numerator)  # +, -, * of integers: always an integer

    return _distinct(n, seed, "arithmetic", draw)


def make_countdown(
    n: int,
    *,
    seed: int,
    numbers: int = 4,
    max_number: int = 50,
    max_target: int = 100,
) -> list[dict[str, str]]:
    """n distinct solvable problems: reach a target in [1, max_target] from ``numbers``
    integers in [1, max_number] with + - * / and parentheses, each number used once."""
    _check_range("numbers", (numbers, numbers), 2, 6)
    _check_range("max_number", (1, max_number), 1, 1000)
    _check_range("max_target", (1, max_target), 1, 100_000)
    rng = random.Random(f"countdown:{seed}")

    def draw() -> tuple[str, str]:
        while True:
            nums = [rng.randint(1, max_number) for _ in range(numbers)]
            solution = _random_expression(rng, nums)
            try:
                value = safe_eval(solution)
            except ExprError:  # a random division by zero
                continue
            if value.denominator == 1 and 1 <= value <= max_target:
                target = int(value)
                prompt = f"Make {target} with {' '.join(map(str, nums))}:"
                answer = {"target": target, "numbers": nums, "solution": solution}
                return prompt, json.dumps(answer)

    return _distinct(n, seed, "countdown", draw)


class ArithmeticScorer:
    """Exact integer match of the final answer against row["answer"]."""

    name = "arithmetic"

    def score(self, row: Mapping[str, Any], completion: str) -> Reward:
        return self.score_inline(row, completion)

    def score_inline(self, row: Mapping[str, Any], completion: str) -> Reward:
        if not isinstance(completion, str):
            return wrong(f"completion is {type(completion).__name__}, not text")
        found = extract_final_answer(completion, prompt=row.get("prompt"))
        if found is None:
            return wrong("no final answer")
        found = found.strip()
        if not _INT_RE.fullmatch(found):
            return wrong(f"final answer is not an integer: {found[:40]!r}")
        expected = arithmetic_reference(row["answer"])
        got = int(found)
        if got == expected:
            return correct()
        return wrong(f"wrong answer: got {got}, expected {expected}")


class CountdownScorer:
    """Checks that the final expression uses the given numbers and reaches the target."""

    name = "countdown"

    def __init__(self, *, use_all: bool = True) -> None:
        self.use_all = use_all

    def score(self, row: Mapping[str, Any], completion: str) -> Reward:
        return self.score_inline(row, completion)

    def score_inline(self, row: Mapping[str, Any], completion: str) -> Reward:
        if not isinstance(completion, str):
            return wrong(f"completion is {type(completion).__name__}, not text")
        target, nums = _countdown_answer(row["answer"])
        found = extract_final_answer(completion, fallback="line", prompt=row.get("prompt"))
        if found is None:
            return wrong("no final answer")
        if len(found) > MAX_ANSWER_CHARS:
            return wrong("final answer too long")
        expr = _strip_equation(found, target)
        try:
            node = parse_expr(expr)
            used = integer_literals(node)
            value = evaluate(node)
        except ExprError as exc:
            return wrong(f"invalid expression: {exc}")
        used_c, given_c = Counter(used), Counter(nums)
        if used_c - given_c:
            extra = sorted((used_c - given_c).elements())
            return wrong(f"uses numbers not given (or too often): {extra}")
        if self.use_all and used_c != given_c:
            unused = sorted((given_c - used_c).elements())
            return wrong(f"does not use every number exactly once; unused: {unused}")
        if value != target:
            return wrong(f"expression equals {_fmt(value)}, target is {target}")
        return correct()


def countdown_answer(answer: str) -> tuple[int, list[int]]:
    """(target, numbers) from a countdown row's answer JSON."""
    return _countdown_answer(answer)


def arithmetic_reference(answer: Any) -> int:
    """The integer an arithmetic row's reference answer denotes: an int, or a float / decimal
    text with an integral value (142, 142.0, "142", " 142.0 ", "1.42e2"); ValueError otherwise
    (142.5, "abc", nan, a bool)."""
    if isinstance(answer, bool):
        value = None
    elif isinstance(answer, int):
        return answer
    elif isinstance(answer, float | Decimal):
        value = Decimal(answer)
    else:
        text = str(answer).strip()
        if _INT_RE.fullmatch(text):
            return int(text)
        try:
            value = Decimal(text) if len(text) <= 80 else None
        except InvalidOperation:
            value = None
    # adjusted() < 64: at most 64 digits, as for a completion's answer (no 1e999999 blow-up)
    if (
        value is not None
        and value.is_finite()
        and value.adjusted() < 64
        and value == value.to_integral_value()
    ):
        return int(value)
    raise ValueError(
        f"arithmetic row answer {str(answer)[:80]!r} is not an integer. Fix: give the exact "
        "integer value as the answer (e.g. 142; 142.0 is read as 142)."
    )


# ----------------------------------------------------------------------------- helpers
def _countdown_answer(answer: Any) -> tuple[int, list[int]]:
    try:
        data = json.loads(answer) if isinstance(answer, str) else answer
        target = int(data["target"])
        nums = [int(x) for x in data["numbers"]]
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(
            f"countdown row answer is not valid ({type(exc).__name__}): {str(answer)[:80]!r}. "
            'Fix: answer must be JSON like {"target": 75, "numbers": [3, 7, 25, 50]}.'
        ) from None
    return target, nums


def _strip_equation(text: str, target: int) -> str:
    text = text.strip().strip("$").strip()
    if text.endswith("."):
        text = text[:-1]
    parts = [p.strip() for p in text.split("=")]
    if len(parts) == 2:
        left, right = parts
        if right == str(target):
            return left
        if left == str(target):
            return right
    return text


def _random_expression(rng: random.Random, nums: list[int]) -> str:
    """A random fully-bracketed expression using every number once, in shuffled order."""
    leaves = [str(x) for x in nums]
    rng.shuffle(leaves)

    def build(items: list[str]) -> tuple[str, bool]:  # (text, is_compound)
        if len(items) == 1:
            return items[0], False
        cut = rng.randint(1, len(items) - 1)
        (left, lc), (right, rc) = build(items[:cut]), build(items[cut:])
        op = rng.choice("+-*/")
        return f"{'(' + left + ')' if lc else left}{op}{'(' + right + ')' if rc else right}", True

    return build(leaves)[0]


def _distinct(n: int, seed: int, task: str, draw) -> list[dict[str, str]]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}. Fix: pass the number of prompts.")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(
                f"could only make {len(rows)} distinct {task} prompts of the {n} asked for. "
                "Fix: lower n or widen the ranges (digits/terms, numbers/max_number)."
            )
        prompt, answer = draw()
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append(
            {
                "prompt_id": f"{task}-{seed}-{len(rows):06d}",
                "prompt": prompt,
                "answer": answer,
                "task": task,
            }
        )
    return rows


def _check_range(name: str, pair: tuple[int, int], lo: int, hi: int) -> tuple[int, int]:
    a, b = pair
    if not (isinstance(a, int) and isinstance(b, int) and lo <= a <= b <= hi):
        raise ValueError(
            f"{name}={pair!r} is out of range. Fix: use integers with {lo} <= low <= high <= {hi}."
        )
    return a, b


def _fmt(value: Fraction) -> str:
    return (
        str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    )
