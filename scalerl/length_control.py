"""Interruption-based length control (paper sec. 4 and appendix; SCALERL.md sec. 6).

A completion is ``<thinking> </think> <answer>``. Each sequence draws a thinking budget B
uniformly in [thinking_budget_min, thinking_budget_max] (the paper: [10k, 12k]). If the
model has not closed its thinking after B completion tokens, generation is interrupted:
the phrase

    "Okay, time is up. Let me stop thinking and formulate a final answer now. </think>"

is appended and the model continues for at most ``answer_budget`` answer tokens.

Usage (any engine; one ``SequenceLength`` per sampled sequence)::

    policy = LengthPolicy.from_tokenizer(tok, max_new_tokens=..., thinking_budget_min=...,
                                         thinking_budget_max=..., answer_budget=...)
    seq = policy.start(seed)
    for each sampled token t:
        d = seq.push(t)
        if d.inject: feed d.inject to the model as forced tokens (not sampled!)
        if d.finish: stop; seq.finish_reason is set

Precise semantics (n = completion tokens so far, sampled + injected):

- Thinking ends when the ``think_end_ids`` sequence (``</think>``) has just been produced.
  ``thinking_tokens`` counts the completion tokens up to and including that marker
  (an injected phrase included); ``answer_tokens`` counts the tokens after it.
  thinking_tokens + answer_tokens == n always.
- Interruption: when the B-th thinking token is pushed and thinking is still open, the
  decision is ``inject(interruption_ids)``. A marker completed by that same token wins
  (no interruption).
- Injected tokens are NOT sampled by the policy. Engines record them with ``sampled=False``
  and logprob 0.0; the trainer must keep them as context but mask them out of the loss
  and out of importance ratios (rho is undefined for a token pi_gen never chose).
- After an interruption the answer is capped at ``answer_budget`` tokens. After a natural
  ``</think>`` only max_new_tokens applies (the model chose to stop thinking in time).
- Finish reasons: an EOS token -> "stop", or "interrupted" if the sequence was interrupted
  earlier (it answered after the phrase). Hitting max_new_tokens or the answer budget ->
  "length" (a truncation, whether or not it was interrupted; ``interrupted`` tells).
  The EOS token itself is part of the completion (it is sampled and trained on).
- enabled=False: only EOS and max_new_tokens apply; think markers are still counted.
- If the phrase does not fit in max_new_tokens, only the part that fits is injected and
  the sequence finishes with "length".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

INTERRUPTION_PHRASE = (
    "Okay, time is up. Let me stop thinking and formulate a final answer now. </think>"
)
FINISH_REASONS = ("stop", "interrupted", "length")


@dataclass(frozen=True)
class Decision:
    """What the engine does after a push: append ``inject`` (forced tokens), then stop if
    ``finish`` is set (one of FINISH_REASONS); both empty means keep sampling."""

    inject: tuple[int, ...] = ()
    finish: str | None = None


CONTINUE = Decision()


@dataclass(frozen=True)
class LengthPolicy:
    """Length limits shared by every sequence of a run."""

    max_new_tokens: int
    """Hard cap on completion tokens (sampled + injected)."""
    thinking_budget_min: int
    """Smallest thinking budget drawn per sequence (paper: 10,240)."""
    thinking_budget_max: int
    """Largest thinking budget drawn per sequence (paper: 12,288)."""
    answer_budget: int
    """Cap on answer tokens after an interruption (paper: 2,048)."""
    think_end_ids: tuple[int, ...]
    """Token ids of the thinking terminator, e.g. (id("</think>"),)."""
    interruption_ids: tuple[int, ...]
    """Token ids of INTERRUPTION_PHRASE."""
    eos_ids: frozenset[int]
    """Tokens that end a completion."""
    enabled: bool = True
    """False: no interruption and no answer budget; only EOS and max_new_tokens."""
    think_start_ids: tuple[int, ...] = ()
    """Token ids of the thinking opener (``<think>``), to read a prompt's thinking state."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} < 1. Fix: use at least 1.")
        if self.enabled:
            if not 1 <= self.thinking_budget_min <= self.thinking_budget_max:
                raise ValueError(
                    f"thinking budget range [{self.thinking_budget_min}, "
                    f"{self.thinking_budget_max}] is empty or below 1. "
                    "Fix: use 1 <= thinking_budget_min <= thinking_budget_max."
                )
            if not self.think_end_ids or not self.interruption_ids:
                raise ValueError(
                    "think_end_ids and interruption_ids must be non-empty with enabled=True. "
                    "Fix: build the policy with LengthPolicy.from_tokenizer(...)."
                )
            if self.answer_budget < 0:
                raise ValueError(f"answer_budget={self.answer_budget} < 0. Fix: use >= 0.")

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer,
        *,
        max_new_tokens: int,
        thinking_budget_min: int,
        thinking_budget_max: int,
        answer_budget: int,
        enabled: bool = True,
        think_end: str = "</think>",
        phrase: str = INTERRUPTION_PHRASE,
        think_start: str | None = None,
    ) -> LengthPolicy:
        """Token ids for the marker, the phrase and EOS taken from a HF tokenizer."""
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token_id. Fix: set eos_token on the tokenizer.")
        eos = {tokenizer.eos_token_id}
        extra = getattr(getattr(tokenizer, "generation_config", None), "eos_token_id", None)
        eos.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
        return cls(
            max_new_tokens=max_new_tokens,
            thinking_budget_min=thinking_budget_min,
            thinking_budget_max=thinking_budget_max,
            answer_budget=answer_budget,
            think_end_ids=tuple(tokenizer.encode(think_end, add_special_tokens=False)),
            interruption_ids=tuple(tokenizer.encode(phrase, add_special_tokens=False)),
            eos_ids=frozenset(eos),
            enabled=enabled,
            think_start_ids=tuple(
                tokenizer.encode(think_start or opener_of(think_end), add_special_tokens=False)
            ),
        )

    @classmethod
    def only_max_tokens(cls, max_new_tokens: int, eos_ids: frozenset[int]) -> LengthPolicy:
        """No length control beyond EOS and a token cap."""
        return cls(max_new_tokens, 0, 0, 0, (), (), frozenset(eos_ids), enabled=False)

    def start(
        self, seed: int, *, room: int | None = None, thinking_closed: bool = False
    ) -> SequenceLength:
        """A fresh per-sequence state; the thinking budget is drawn from ``seed``.

        ``room``: tokens left in the model's context after the prompt; the sequence then
        finishes with "length" after min(max_new_tokens, room) tokens.
        ``thinking_closed``: the rendered prompt already closed its thinking
        (``thinking_closed(prompt_ids)``, read once per prompt: a chat template with thinking
        switched off writes ``<think>\n\n</think>`` into the prompt, Qwen3's
        enable_thinking=false), so the completion is all answer: no interruption, every token
        counted as an answer token.
        """
        budget = random.Random(seed).randint(self.thinking_budget_min, self.thinking_budget_max)
        limit = self.max_new_tokens if room is None else min(self.max_new_tokens, room)
        seq = SequenceLength(self, budget if self.enabled else 0, limit)
        seq.thinking_done = thinking_closed
        return seq

    def thinking_closed(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt's last thinking marker is an end of thinking (``</think>`` after
        the last ``<think>``, or a ``</think>`` with no ``<think>``)."""
        end = _last_index(prompt_ids, self.think_end_ids)
        return end >= 0 and end > _last_index(prompt_ids, self.think_start_ids)


def opener_of(think_end: str) -> str:
    """The opening tag of a closing one: "</think>" -> "<think>" (else "<think>")."""
    return "<" + think_end[2:] if think_end.startswith("</") else "<think>"


def _last_index(ids: list[int], marker: tuple[int, ...]) -> int:
    """Start of the last occurrence of `marker` in `ids`, -1 if none (or no marker)."""
    n = len(marker)
    if not n:
        return -1
    first = marker[0]
    for i in range(len(ids) - n, -1, -1):
        if ids[i] == first and tuple(ids[i : i + n]) == marker:
            return i
    return -1


class SequenceLength:
    """Per-sequence state machine; see the module docstring for the exact rules."""

    def __init__(self, policy: LengthPolicy, thinking_budget: int, max_new_tokens: int) -> None:
        self.policy = policy
        self.thinking_budget = thinking_budget
        self.max_new_tokens = max_new_tokens
        self.n = 0
        self.thinking_tokens = 0
        self.answer_tokens = 0
        self.thinking_done = False
        self.interrupted = False
        self.finish_reason: str | None = None
        self._tail: list[int] = []  # last len(think_end_ids) tokens, to spot the marker

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def max_tokens_before_decision(self) -> int:
        """Tokens an engine may sample before the next possible intervention (besides EOS
        and a natural </think>): for engines that generate in chunks."""
        remaining = self.max_new_tokens - self.n
        if not self.policy.enabled:
            return remaining
        if self.interrupted:
            return min(remaining, self.policy.answer_budget - self.answer_tokens)
        if self.thinking_done:
            return remaining
        return min(remaining, self.thinking_budget - self.thinking_tokens)

    def push(self, token_id: int) -> Decision:
        """Record one sampled token and say what happens next."""
        if self.done:
            raise RuntimeError(
                f"push after the sequence finished ({self.finish_reason}). "
                "Fix: stop sampling once a Decision has finish set."
            )
        self._count(token_id)
        p = self.policy
        if token_id in p.eos_ids:
            return self._finish("interrupted" if self.interrupted else "stop")
        if self.n >= self.max_new_tokens:
            return self._finish("length")
        if not p.enabled:
            return CONTINUE
        if self.interrupted:
            return self._finish("length") if self.answer_tokens >= p.answer_budget else CONTINUE
        if self.thinking_done:
            return CONTINUE
        if self.thinking_tokens >= self.thinking_budget:
            return self._interrupt()
        return CONTINUE

    def _count(self, token_id: int) -> None:
        self.n += 1
        if self.thinking_done:
            self.answer_tokens += 1
            return
        self.thinking_tokens += 1
        marker = self.policy.think_end_ids
        if marker:
            self._tail = (self._tail + [token_id])[-len(marker) :]
            self.thinking_done = tuple(self._tail) == marker

    def _interrupt(self) -> Decision:
        self.interrupted = True
        room = self.max_new_tokens - self.n
        phrase = self.policy.interruption_ids[:room]
        for t in phrase:
            self._count(t)
        # The phrase ends with the marker; if it was cut short, thinking is still "closed"
        # by the interruption for counting purposes.
        self.thinking_done = True
        if len(phrase) < len(self.policy.interruption_ids) or self.n >= self.max_new_tokens:
            self.finish_reason = "length"
            return Decision(inject=phrase, finish="length")
        if self.policy.answer_budget == 0:
            self.finish_reason = "length"
            return Decision(inject=phrase, finish="length")
        return Decision(inject=phrase)

    def _finish(self, reason: str) -> Decision:
        self.finish_reason = reason
        return Decision(finish=reason)
