"""The reward contract: ``Reward``, the ``Scorer`` protocol and final-answer extraction.

ScaleRL trains on verifiable rewards: a completion is correct or not (SCALERL.md sec. 3).
A ``Reward`` carries the value (1.0 / 0.0; the loss maps it to its own convention),
the pass flag and a short human-readable reason, so a scored shard explains itself.

Final-answer rule (``extract_final_answer``), applied in this order:

1. The answer section is the text after the last ``</think>``. A completion that opens
   ``<think>`` (or whose rendered prompt ends inside ``<think>``) and never closes it has no
   answer section (its reasoning was cut off): the result is None, so a \boxed{} answer
   written inside the thinking scores 0. Without any think tags the whole completion is the
   answer.
2. In the answer section, the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces
   balance (nested braces allowed) wins.
3. Otherwise the last "Answer: X" / "answer is X" (case-insensitive), up to the end of
   its line, with surrounding ``$``, ``**`` and a trailing period stripped.
4. Otherwise the last number in the answer section (``-12``, ``3.5``, ``1/2``, ``1,000``).
5. Otherwise None.

Everything here is linear in the completion's length, so a megabyte of junk costs
milliseconds and cannot hang; verifiers bound their own work (see sandbox.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

ROW_KEYS = ("prompt", "answer", "task")
# Longer extracted answers are treated as malformed: no real final answer is this long,
# and a verifier should not be handed megabytes.
MAX_ANSWER_CHARS = 1_000
_REASON_CHARS = 200

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_RE = re.compile(r"(?:answer\s*(?:is|:)|answer\s*=)\s*:?\s*([^\n]*)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


@dataclass(frozen=True)
class Reward:
    """One completion's verifiable reward."""

    value: float
    """1.0 when correct, 0.0 otherwise."""
    passed: bool
    """Whether the completion counts as a pass (for pass rates and the curriculum)."""
    reason: str
    """Short explanation: "correct", "wrong answer: got 12, expected 13", "timeout", ..."""


def correct(reason: str = "correct") -> Reward:
    return Reward(1.0, True, reason)


def wrong(reason: str) -> Reward:
    return Reward(0.0, False, _clip(reason))


@runtime_checkable
class Scorer(Protocol):
    """Scores one completion against one dataset row (keys at least prompt, answer, task)."""

    name: str

    def score(self, row: Mapping[str, Any], completion: str) -> Reward: ...


def prompt_opens_thinking(prompt: str | None) -> bool:
    """Whether a rendered prompt leaves thinking open (ends inside ``<think>``, as templates of
    reasoning models that start the assistant turn with ``<think>\n`` do): the completion then
    starts in its reasoning."""
    if not prompt:
        return False
    return prompt.rfind("<think>") > prompt.rfind("</think>")


def answer_section(completion: str, *, prompt: str | None = None) -> str | None:
    """The text after the last ``</think>``; None if thinking was opened (in the completion, or
    by the prompt) and never closed: an answer written inside the thinking is not an answer."""
    end = completion.rfind("</think>")
    if end >= 0:
        return completion[end + len("</think>") :]
    if "<think>" in completion or prompt_opens_thinking(prompt):
        return None
    return completion


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]  # index just after each "{"
    if not starts:
        return None
    # One pass over the braces pairs every "{" with its "}" (linear, unlike rescanning
    # from each \boxed, which is quadratic on inputs like "\boxed{" * 100000).
    match: dict[int, int] = {}
    stack: list[int] = []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            match[stack.pop()] = m.start()
    for start in reversed(starts):
        close = match.get(start - 1)
        if close is not None:
            return text[start:close].strip()
    return None


def has_unclosed_box(text: str) -> bool:
    """Whether some ``\\boxed{`` (or ``\\fbox{``) in ``text`` never closes its brace: such a
    reference answer can never be matched (data.py refuses it at load)."""
    starts = [m.end() - 1 for m in _BOX_RE.finditer(text)]  # index of each "{"
    if not starts:
        return False
    closed: set[int] = set()
    stack: list[int] = []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closed.add(stack.pop())
    return any(start not in closed for start in starts)


def extract_final_answer(
    completion: str, *, fallback: str = "number", prompt: str | None = None
) -> str | None:
    """The completion's final answer by the module's rule (boxed > "Answer:" > last number).

    ``fallback="line"`` replaces step 4 by "the last non-empty line", for tasks whose
    answer is an expression rather than a number (countdown). ``prompt``: the rendered prompt,
    whose open ``<think>`` means the completion starts inside its thinking.
    """
    if not isinstance(completion, str):
        return None
    section = answer_section(completion, prompt=prompt)
    if section is None:
        return None
    boxed = last_boxed(section)
    if boxed is not None:
        return boxed
    answer_lines = _ANSWER_RE.findall(section)
    if answer_lines:
        found = _strip_decoration(answer_lines[-1])
        if found:
            return found
    if fallback == "line":
        lines = [line.strip() for line in section.splitlines() if line.strip()]
        return lines[-1] if lines else None
    numbers = _NUMBER_RE.findall(section)
    if numbers:
        return numbers[-1]
    return None


def check_row(row: Mapping[str, Any]) -> None:
    """Raise ValueError naming the missing keys of a dataset row."""
    if not isinstance(row, Mapping):
        raise ValueError(
            f"a reward row must be a mapping, got {type(row).__name__}. "
            f"Fix: pass dicts with keys {list(ROW_KEYS)}."
        )
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(
            f"reward row is missing {missing} (has {sorted(map(str, row))[:10]}). "
            f"Fix: every prompt row needs {list(ROW_KEYS)}."
        )


def _strip_decoration(text: str) -> str:
    text = text.strip()
    for _ in range(3):
        before = text
        text = text.strip().strip("*").strip("$").strip()
        if text.endswith("."):
            text = text[:-1]
        if text.startswith("\\(") and text.endswith("\\)"):
            text = text[2:-2]
        if text == before:
            break
    return text.strip()


def _clip(text: str) -> str:
    """Short, printable, UTF-8-encodable (reasons go to Parquet and logs)."""
    text = text[:_REASON_CHARS]
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."
