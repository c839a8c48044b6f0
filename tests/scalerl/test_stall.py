"""The stall guard (scalerl/stall.py): counts batches that made no trainer step and, after
`limit` in a row, stops with one line that names the cause."""

import pyarrow as pa

from scalerl.stall import StallGuard, count_scorer_failures, scorer_failure


def _batch(rewards, reasons):
    return pa.table({"reward": pa.array(rewards, pa.float32()), "reward_reason": reasons})


def test_scorer_errors_are_named_with_their_count():
    guard = StallGuard(limit=3)
    error = "error: ValueError: invalid literal for int() with base 10: '142.0'"
    batch = _batch([0.0] * 4, [error, error, "wrong answer: got '7', expected '142.0'", error])
    assert guard.no_step(batch) is None and guard.no_step(batch) is None
    message = guard.no_step(batch)
    assert message.startswith(
        "no trainer step for 3 batches in a row: every reward in 3 batches (12 completions) was 0; "
        '9 scorer errors, most often (9x) "error: ValueError: invalid literal for int()'
    )
    assert "Fix: the scorer cannot read these answers" in message and "\n" not in message
    assert count_scorer_failures(batch) == 3


def test_all_solved_and_never_solved_say_different_things():
    solved = StallGuard(limit=1).no_step(_batch([1.0, 1.0], [None, None]))
    assert "every reward in 1 batches (2 completions) was 1" in solved
    assert "every prompt is already solved" in solved
    never = StallGuard(limit=2)
    never.no_step(_batch([0.0, 0.0], ["no final answer", "wrong answer: got '3'"]))
    message = never.no_step(_batch([1.0, 1.0, 0.0, 0.0], [None, None, "x", "y"]))
    assert (
        "every group in 2 batches (6 completions) had equal rewards (values seen: 0, 1)" in message
    )


def test_a_step_starts_the_count_again_and_zero_never_stops():
    guard = StallGuard(limit=2)
    guard.no_step(_batch([0.0], [None]))
    guard.stepped()
    assert guard.no_step(_batch([0.0], [None])) is None  # 1 in a row, not 2
    off = StallGuard(limit=0)
    assert all(off.no_step(_batch([0.0], [None])) is None for _ in range(1000))


def test_which_reasons_are_scorer_failures():
    assert scorer_failure("timeout: math-verify took more than 5 s") is not None
    assert scorer_failure("crash: worker exited with -9") is not None
    assert scorer_failure("wrong answer: got '1', expected '2'") is None
    assert scorer_failure("no final answer") is None and scorer_failure(None) is None
