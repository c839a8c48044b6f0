"""A run that fails for good (flows/run.py RunFailedError: e.g. a generator slot lost 4 times)
ends the CLI with one `error:` line and exit code 2, as a stalled run does, not a traceback;
`--debug` still shows the traceback."""

from __future__ import annotations

import pytest
import typer

from flows.cli_common import _guard, _state
from flows.run import RunFailedError
from scalerl.stall import RunStalledError

REASON = (
    "run r1 failed: generator slot gen0 lost 4 times. Fix: see the failed task or flow runs; "
    "then `scalerl resume r1` continues from what is committed."
)


@pytest.mark.parametrize("error", [RunFailedError(REASON), RunStalledError(REASON)])
def test_a_failed_run_is_one_error_line_and_exit_2(error, capsys):
    with pytest.raises(typer.Exit) as exited, _guard():
        raise error
    assert exited.value.exit_code == 2  # the code of a stalled run and of every other refusal
    err = capsys.readouterr().err
    assert err == f"error: {REASON}\n"


def test_debug_shows_the_traceback_and_other_runtime_errors_are_not_swallowed():
    _state["debug"] = True
    try:
        with pytest.raises(RunFailedError), _guard():
            raise RunFailedError(REASON)
    finally:
        _state["debug"] = False
    with pytest.raises(RuntimeError, match="a bug"), _guard():
        raise RuntimeError("a bug")  # not a run failure: its traceback stays
