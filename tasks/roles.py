"""The roles of a run (its generators, its trainer) behind one interface, whether they run here as
task runs of the run flow or elsewhere as flow runs on a work pool, so that the run flow
supervises them without knowing which.

    trainer = make_trainer(config, run)      # tasks/trainer_nodes.py: local or remote, chosen once
    trainer.start()
    while not trainer.done(): ...            # cheap: no API call for a task run of this flow
    summary = trainer.result()               # raises the role's failure
    trainer.cancel()                         # the run flow failed: stop a remote role now
    trainer.wait_for_end()                   # after the run's status left "running"

A task run of this flow is watched through TaskRun (its local future: no API call per look);
a role's `waitables()` are what the supervising loop may block on (none for a remote role, whose
state is an API call). `where` names what the role is in the Prefect UI ("task run" or
"flow run"), for the log lines that point the user at it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from concurrent import futures

from runtime.logs import task_logger


class TaskRun:
    """A task run this flow submitted, watched through its local future: done() and waiting cost
    no API call (a Prefect future's .state is one per look until it has ended)."""

    def __init__(self, future) -> None:
        self.future = future

    def done(self) -> bool:
        return self.future.wrapped_future.done()

    def failed(self) -> bool:
        """Ended in a Failed state (asked only once it has ended: .state is then final)."""
        return self.done() and self.future.state.is_failed()

    def state(self) -> str:
        """ "running", "completed" or "failed" (anything ended but not completed)."""
        if not self.done():
            return "running"
        return "completed" if self.future.state.is_completed() else "failed"

    def result(self):
        return self.future.result()  # raises the task run's error

    def wait(self, timeout: float | None = None) -> None:
        self.future.wait(timeout)

    @property
    def waitable(self) -> futures.Future:
        return self.future.wrapped_future


def wait_first(waitables, timeout: float | None = None) -> None:
    """Until one of `waitables` (concurrent futures) is done or `timeout` passes; with none
    still running, sleeps `timeout` (a loop over remote roles then looks again)."""
    running = [f for f in waitables if not f.done()]
    if not running:
        time.sleep(timeout or 0.0)
        return
    futures.wait(running, timeout=timeout, return_when=futures.FIRST_COMPLETED)


def wait_all(task_runs) -> None:
    """Until every one of `task_runs` (TaskRun) has ended."""
    futures.wait([t.waitable for t in task_runs])


class Role(ABC):
    """A role of the run the flow starts and supervises (see the module docstring)."""

    where = "task run"  # what it is in the Prefect UI
    end_wait_s: float | None = None  # at the end, how long the run waits before cancelling it
    poll_s = 1.0  # wait() looks this often when there is no future to block on

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def done(self) -> bool:
        """Whether it has ended (a lost part that is being replaced is not an end)."""

    @abstractmethod
    def result(self):
        """What it returned; raises its failure."""

    def cancel(self) -> None:  # noqa: B027 - by default: nothing to do
        """Stop it now (best effort). A role on this machine stops with the run's status (or
        runtime.isolated.stop_children): nothing to do."""

    def waitables(self) -> list[futures.Future]:
        """Futures that complete when (part of) it ends: what the loop may block on."""
        return []

    def wait(self, deadline: float | None = None) -> None:
        """Until it has ended, or until time.monotonic() passes `deadline`: then it is
        cancelled (its machine may be gone, and one still scheduled would start late)."""
        while not self.done():
            if deadline is not None and time.monotonic() > deadline:
                task_logger().warning("%s has not ended: cancelling it", self)
                self.cancel()
                return
            left = self.poll_s if deadline is None else max(0.0, deadline - time.monotonic())
            wait_first(self.waitables(), min(self.poll_s, left))

    def wait_for_end(self) -> None:
        """wait() with this role's own patience (end_wait_s from now; None: until it ends)."""
        self.wait(None if self.end_wait_s is None else time.monotonic() + self.end_wait_s)


class TaskRunRole(Role):
    """A role that is one task run of this flow (e.g. the local trainer)."""

    def __init__(self, name: str, submit) -> None:
        self.name, self._submit, self.task_run = name, submit, None

    def __repr__(self) -> str:
        return f"{self.name} ({self.where})"

    def start(self) -> None:
        self.task_run = TaskRun(self._submit())

    def done(self) -> bool:
        return self.task_run.done()

    def result(self):
        return self.task_run.result()

    def waitables(self) -> list[futures.Future]:
        return [self.task_run.waitable]

    def wait(self, deadline: float | None = None) -> None:
        self.task_run.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
