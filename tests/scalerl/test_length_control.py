"""Interruption length control driven by scripted token streams through every finish reason."""

import pytest

from scalerl.length_control import INTERRUPTION_PHRASE, LengthPolicy
from scalerl.models import build_tiny_tokenizer

EOS, END = 0, 9  # END = "</think>"
PHRASE = (7, 8, END)  # a 3-token stand-in for the interruption phrase, ending in </think>
T = 5  # an ordinary token


def policy(**kw) -> LengthPolicy:
    base = dict(
        max_new_tokens=100,
        thinking_budget_min=10,
        thinking_budget_max=10,
        answer_budget=6,
        think_end_ids=(END,),
        interruption_ids=PHRASE,
        eos_ids=frozenset({EOS}),
    )
    return LengthPolicy(**{**base, **kw})


def drive(pol: LengthPolicy, stream: list[int], seed: int = 0):
    """Push sampled tokens like an engine would; return (tokens, sampled mask, state)."""
    seq = pol.start(seed)
    tokens, sampled = [], []
    it = iter(stream)
    while not seq.done:
        t = next(it)
        tokens.append(t)
        sampled.append(True)
        d = seq.push(t)
        tokens += d.inject
        sampled += [False] * len(d.inject)
    return tokens, sampled, seq


def test_natural_think_end_then_eos_is_stop():
    stream = [T] * 4 + [END] + [T] * 2 + [EOS]
    tokens, sampled, seq = drive(policy(), stream)
    assert tokens == stream and all(sampled)
    assert (seq.finish_reason, seq.interrupted) == ("stop", False)
    assert (seq.thinking_tokens, seq.answer_tokens) == (5, 3)  # marker in thinking, EOS in answer


def test_eos_while_thinking_is_stop():
    _, _, seq = drive(policy(), [T, T, EOS])
    assert (seq.finish_reason, seq.thinking_tokens, seq.answer_tokens) == ("stop", 3, 0)


def test_budget_reached_injects_phrase_then_eos_is_interrupted():
    stream = [T] * 10 + [T, T, EOS]
    tokens, sampled, seq = drive(policy(), stream)
    assert tokens == [T] * 10 + list(PHRASE) + [T, T, EOS]
    assert sampled == [True] * 10 + [False] * 3 + [True] * 3
    assert (seq.finish_reason, seq.interrupted) == ("interrupted", True)
    assert (seq.thinking_tokens, seq.answer_tokens) == (13, 3)
    assert seq.n == len(tokens)


def test_interrupted_then_answer_budget_is_length():
    tokens, _, seq = drive(policy(), [T] * 10 + [T] * 50)
    assert tokens == [T] * 10 + list(PHRASE) + [T] * 6
    assert (seq.finish_reason, seq.interrupted, seq.answer_tokens) == ("length", True, 6)


def test_natural_think_end_is_only_capped_by_max_new_tokens():
    tokens, _, seq = drive(policy(max_new_tokens=30), [T, END] + [T] * 50)
    assert len(tokens) == 30  # the answer budget (6) applies only after an interruption
    assert (seq.finish_reason, seq.interrupted, seq.answer_tokens) == ("length", False, 28)


def test_max_new_tokens_while_thinking_is_length():
    tokens, _, seq = drive(policy(max_new_tokens=7), [T] * 50)
    assert (len(tokens), seq.finish_reason, seq.interrupted) == (7, "length", False)


def test_max_new_tokens_caps_the_answer_too():
    tokens, _, seq = drive(policy(max_new_tokens=15), [T] * 50)
    assert tokens == [T] * 10 + list(PHRASE) + [T] * 2
    assert seq.finish_reason == "length"


def test_phrase_that_does_not_fit_is_cut_and_finishes_with_length():
    tokens, sampled, seq = drive(policy(max_new_tokens=12), [T] * 50)
    assert tokens == [T] * 10 + list(PHRASE[:2])
    assert sampled == [True] * 10 + [False] * 2
    assert (seq.finish_reason, seq.interrupted) == ("length", True)


def test_zero_answer_budget_finishes_right_after_the_phrase():
    tokens, _, seq = drive(policy(answer_budget=0), [T] * 50)
    assert tokens == [T] * 10 + list(PHRASE) and seq.finish_reason == "length"


def test_marker_on_the_budget_token_is_not_interrupted():
    tokens, _, seq = drive(policy(), [T] * 9 + [END, T, EOS])
    assert tokens == [T] * 9 + [END, T, EOS]
    assert (seq.finish_reason, seq.interrupted, seq.thinking_tokens) == ("stop", False, 10)


def test_multi_token_marker_must_match_in_order():
    pol = policy(think_end_ids=(3, 4), interruption_ids=(7, 3, 4))
    # "4 3" is not the marker; "3 4" is.
    tokens, _, seq = drive(pol, [4, 3, T, 3, 4, T, EOS])
    assert (seq.finish_reason, seq.thinking_tokens, seq.answer_tokens) == ("stop", 5, 2)
    assert tokens == [4, 3, T, 3, 4, T, EOS]


def test_disabled_only_enforces_eos_and_max_new_tokens():
    pol = LengthPolicy.only_max_tokens(20, frozenset({EOS}))
    tokens, sampled, seq = drive(pol, [T] * 50)
    assert (len(tokens), all(sampled), seq.finish_reason, seq.interrupted) == (
        20,
        True,
        "length",
        False,
    )
    _, _, seq = drive(policy(enabled=False, max_new_tokens=30), [T] * 12 + [EOS])
    assert (seq.finish_reason, seq.n) == ("stop", 13)


def test_thinking_budget_is_uniform_over_the_range_and_seeded():
    pol = policy(thinking_budget_min=10, thinking_budget_max=14)
    budgets = [pol.start(s).thinking_budget for s in range(2000)]
    assert set(budgets) == {10, 11, 12, 13, 14}
    for b in range(10, 15):  # each value ~400 of 2000; 5 sigma is ~90
        assert abs(budgets.count(b) - 400) < 90
    assert [pol.start(7).thinking_budget for _ in range(3)] == [budgets[7]] * 3


def test_max_tokens_before_decision_tracks_the_next_intervention():
    seq = policy(thinking_budget_min=10, thinking_budget_max=10, max_new_tokens=100).start(0)
    assert seq.max_tokens_before_decision() == 10
    for _ in range(4):
        seq.push(T)
    assert seq.max_tokens_before_decision() == 6
    seq.push(END)
    assert seq.max_tokens_before_decision() == 95  # closed in time: only max_new_tokens
    interrupted = policy(max_new_tokens=100).start(0)
    for _ in range(10):
        interrupted.push(T)
    assert interrupted.max_tokens_before_decision() == 6  # the answer budget now
    assert (
        LengthPolicy.only_max_tokens(20, frozenset({EOS})).start(0).max_tokens_before_decision()
        == 20
    )


def test_push_after_finish_is_an_error():
    _, _, seq = drive(policy(), [EOS])
    with pytest.raises(RuntimeError, match="Fix: "):
        seq.push(T)


def test_from_tokenizer_uses_the_real_phrase_and_marker():
    tok = build_tiny_tokenizer()
    pol = LengthPolicy.from_tokenizer(
        tok, max_new_tokens=64, thinking_budget_min=8, thinking_budget_max=8, answer_budget=16
    )
    assert pol.think_end_ids == (tok.convert_tokens_to_ids("</think>"),)
    assert tok.decode(list(pol.interruption_ids)) == INTERRUPTION_PHRASE
    assert pol.interruption_ids[-1:] == pol.think_end_ids
    assert tok.eos_token_id in pol.eos_ids


@pytest.mark.parametrize(
    "kw",
    [
        dict(thinking_budget_min=5, thinking_budget_max=4),
        dict(thinking_budget_min=0),
        dict(max_new_tokens=0),
        dict(interruption_ids=()),
        dict(answer_budget=-1),
    ],
)
def test_invalid_policies_are_rejected(kw):
    with pytest.raises(ValueError, match="Fix: "):
        policy(**kw)


def test_context_room_caps_the_sequence_below_max_new_tokens():
    seq = policy(max_new_tokens=100).start(0, room=4)
    decisions = [seq.push(T) for _ in range(4)]
    assert [d.finish for d in decisions] == [None, None, None, "length"]
    assert seq.max_new_tokens == 4
