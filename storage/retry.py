"""Riding out storage outages: retry StorageUnreachableError with backoff.

    from storage.retry import retry_unreachable
    table = retry_unreachable(lambda: run.read_shard("raw", key), loc, "read raw shard")

Every Run / RunStore method (storage/store.py) is wrapped with `retrying`, so every process of
a run (generators, stages, trainer, the flow loop, status and marker reads) rides out an
endpoint that stops answering for a while, with no retry code at the call sites. The rule:

- An endpoint that has answered at least once in this process is retried for up to
  SCALERL_STORAGE_RETRY_S seconds (default 300), with exponential backoff from 0.5 s to 5 s,
  a warning per failed attempt and a note when it answers again. Then the error propagates
  (the task's own retries and the flow's resume are the next line of defence).
- An endpoint that has never answered in this process fails at once: a wrong URL, a server that
  is not running or a typo in the port is a configuration error, reported in seconds
  (`scalerl doctor`, the first call of `scalerl run`), not an outage to wait out.
- Only StorageUnreachableError is retried. Every other error (corrupt shard, conflict, missing
  credentials) is not transient and propagates at once.
- Nested calls (a store method calling another) retry only at the outermost call, so waits do
  not multiply. Every store method is safe to repeat: commits are exclusive-create-or-compare,
  documents and weights are replaced whole, metrics parts keep their name across attempts.

SCALERL_STORAGE_RETRY_S=0 turns retrying off.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from storage.errors import InvalidInputError, StorageUnreachableError
from storage.fsio import guarded
from storage.paths import Location

RETRY_ENV = "SCALERL_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 300.0
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 5.0

log = logging.getLogger("scalerl.storage")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_reached: set[tuple[str, str]] = set()  # (protocol, endpoint) that answered in this process
_state = threading.local()


def retry_window_s() -> float:
    """Seconds an outage of a known endpoint is waited out (SCALERL_STORAGE_RETRY_S)."""
    raw = os.environ.get(RETRY_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_RETRY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0.0 or value == float("inf"):
        raise InvalidInputError(
            f"{RETRY_ENV}={raw!r} is not a number of seconds >= 0. Fix: set it to e.g. 300 "
            "(how long to wait out an unreachable storage endpoint), 0 to fail at once, "
            "or unset it."
        )
    return value


def _key(loc: Location) -> tuple[str, str]:
    return loc.protocol, loc.endpoint


def has_answered(loc: Location) -> bool:
    """Whether this endpoint has answered a store call in this process."""
    return _key(loc) in _reached


def retry_unreachable(
    fn: Callable[[], T],
    loc: Location,
    what: str,
    *,
    window_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call fn(); while it raises StorageUnreachableError for an endpoint that has answered
    before, wait (0.5 s, 1 s, 2 s, ... capped at 5 s) and call it again, for up to `window_s`
    seconds (default: retry_window_s()). Then re-raise the last error."""
    window = retry_window_s() if window_s is None else window_s
    start, delay, attempt = clock(), FIRST_DELAY_S, 0
    while True:
        try:
            result = fn()
        except StorageUnreachableError:
            attempt += 1
            waited = clock() - start
            if not has_answered(loc) or waited + delay > window:
                if attempt > 1:
                    log.error(
                        "storage %s still unreachable after %.0f s and %d attempts (%s): giving up",
                        loc.endpoint,
                        waited,
                        attempt,
                        what,
                    )
                raise
            log.warning(
                "storage %s unreachable (%s, attempt %d, %.0f s so far); retrying in %.1f s "
                "for up to %.0f s",
                loc.endpoint,
                what,
                attempt,
                waited,
                delay,
                window,
            )
            sleep(delay)
            delay = min(2 * delay, MAX_DELAY_S)
            continue
        _reached.add(_key(loc))
        if attempt:
            log.warning(
                "storage %s answers again after %.1f s (%s)", loc.endpoint, clock() - start, what
            )
        return result


def retrying(method: F) -> F:
    """Like fsio.guarded (translate provider errors), plus retry_unreachable at the outermost
    store call. Decorates methods of objects with a `_loc` attribute."""
    inner = guarded(method)

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_state, "active", False):  # an outer store call owns the retry loop
            return inner(self, *args, **kwargs)
        _state.active = True
        try:
            return retry_unreachable(
                lambda: inner(self, *args, **kwargs), self._loc, method.__qualname__
            )
        finally:
            _state.active = False

    return wrapper  # type: ignore[return-value]
