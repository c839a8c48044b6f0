"""Chaos seam: kill this process at a named point, for crash-recovery tests.

    SCALERL_CHAOS="trainer.after_publish:3"    # SIGKILL the 3rd time that point is reached

`kill_point(name)` costs one environment lookup when the variable is unset. The points are
placed where a crash is most likely to break the failure contract (between a computation and
its commit, between a commit and the next bookkeeping write):

    generator.before_commit  generator.after_commit        (tasks/rollouts.py)
    scorer.before_commit     curriculum.before_commit      (tasks/stages.py)
    filter.before_commit
    trainer.after_step       trainer.after_publish         (scalerl/trainer/loop.py)
    publisher.before_commit  (the background publisher thread: trained, saved, not yet
                              visible; runtime/transports/publisher.py)
    pruner.before_delete     (retention, on the same thread; runtime/retention.py)
    flow.loop                                              (flows/run.py)

Stages run in the flow process; generators and the trainer run in child processes of it
(runtime/isolated.py). A point hit in such a child kills the flow process first and then the
child, so a kill at any component's moment is a whole-node loss.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

CHAOS_ENV = "SCALERL_CHAOS"
POINTS = (
    "generator.before_commit",
    "generator.after_commit",
    "scorer.before_commit",
    "curriculum.before_commit",
    "filter.before_commit",
    "trainer.after_step",
    "trainer.after_publish",
    "publisher.before_commit",
    "pruner.before_delete",
    "flow.loop",
)

_hits: Counter[str] = Counter()
_lock = threading.Lock()


def parse(spec: str) -> tuple[str, int]:
    """'point:n' -> (point, n); ValueError naming the problem otherwise."""
    point, sep, count = spec.rpartition(":")
    if not sep or point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"{CHAOS_ENV}={spec!r}: expected POINT:N with N >= 1 and POINT one of {', '.join(POINTS)}"
        )
    return point, int(count)


def kill_point(name: str) -> None:
    """SIGKILL this process if SCALERL_CHAOS names `name` and this is its N-th hit."""
    spec = os.environ.get(CHAOS_ENV)
    if not spec:
        return
    point, count = parse(spec)
    if point != name:
        return
    with _lock:
        _hits[name] += 1
        if _hits[name] == count:
            parent = os.environ.get("SCALERL_ISOLATED_PARENT")  # runtime.isolated.PARENT_ENV
            if parent and parent.isdigit() and int(parent) != os.getpid():
                os.kill(int(parent), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
