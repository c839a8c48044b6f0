"""The trainer as a role of the run flow (tasks/roles.py): here (a train_policy task run) or one
flow run per node of placement.trainer_deployment (runtime/trainer_node.py has what a node runs).

    trainer = make_trainer(config, run)   # which of the two: chosen once, from the placement
    trainer.start()
"""

from __future__ import annotations

import time
import uuid

from runtime.logs import task_logger
from runtime.trainer_node import (
    CHECK_EVERY_S,
    MAX_ATTEMPTS,
    RESTART_WAIT_S,
    SUMMARY,
    TrainerNodesError,
)
from scalerl.config import RunConfig
from tasks.flow_runs import cancel_flow_runs, flow_run_states, start_role
from tasks.roles import Role, TaskRunRole


class LocalTrainer(TaskRunRole):
    """The train_policy task run of this flow, supervising the trainer's process(es) here."""

    def __init__(self, config: RunConfig, run) -> None:
        from tasks.train import train_policy

        super().__init__("the trainer", lambda: train_policy.submit(config, run.run_id))


class RemoteTrainer(Role):
    """One child flow run per node of placement.trainer_deployment; a lost node restarts the
    whole attempt (up to MAX_ATTEMPTS) from the newest checkpoint."""

    where = "flow run"

    def __init__(self, config: RunConfig, run) -> None:
        self.config, self.run, self.run_id = config, run, run.run_id
        self.attempts: list[tuple[str, list]] = []  # (attempt id, node flow run ids)
        self._checked, self._done, self._error = float("-inf"), False, None
        self._restart_after: float | None = None  # set while a lost attempt winds down

    def __repr__(self) -> str:
        return f"the trainer ({self.config.placement.nodes} node flow runs)"

    def start(self) -> None:
        """A new attempt: one flow run per node. Each id is recorded as it is created, so a
        failure half-way leaves no node unknown (it is cancelled with its attempt)."""
        attempt = f"{self.run_id}-{len(self.attempts)}-{uuid.uuid4().hex[:6]}"
        runs = []
        self.attempts.append((attempt, runs))
        for rank in range(self.config.placement.nodes):
            flow_run = start_role(
                self.config,
                self.run_id,
                self.config.placement.trainer_deployment,
                f"trainer-node{rank}",
                "trainer",
                node_rank=rank,
                attempt=attempt,
            )
            runs.append(flow_run.id)
        task_logger().info(
            "trainer attempt %s: %d node flow runs of %s",
            attempt,
            len(runs),
            self.config.placement.trainer_deployment,
        )

    def _states(self) -> list:
        return flow_run_states(self.attempts[-1][1])

    def cancel(self) -> None:
        if self.attempts:
            cancel_flow_runs(self.attempts[-1][1])

    def done(self) -> bool:
        """Whether the trainer has ended (a lost attempt is restarted, not done). A new attempt
        starts only once every node of the lost one has ended (cancelled), or RESTART_WAIT_S
        after asking, so two attempts never write the run at once (their nodes also check the
        run's writer lease)."""
        if self._done:
            return True
        if time.monotonic() - self._checked < CHECK_EVERY_S:
            return False
        self._checked = time.monotonic()
        try:
            states = self._states()
        except Exception as exc:  # noqa: BLE001 - the API blinked: ask again
            task_logger().warning("could not read the trainer nodes' flow runs (%s)", exc)
            return False
        if self._restart_after is not None:
            ended = all(s is not None and s.is_final() for s in states)
            if ended or time.monotonic() > self._restart_after:
                self._restart_after = None
                try:
                    self.start()
                except Exception as exc:  # noqa: BLE001 - retried at the next look
                    task_logger().warning("could not start a new trainer attempt yet (%s)", exc)
                    self._restart_after = time.monotonic()
            return False
        lost = [
            i
            for i, s in enumerate(states)
            if s is not None and s.is_final() and not s.is_completed()
        ]
        if lost or len(states) < self.config.placement.nodes:
            self.cancel()
            if len(self.attempts) >= MAX_ATTEMPTS:
                self._error = TrainerNodesError(
                    f"the trainer failed {len(self.attempts)} times over its nodes (last: node(s) "
                    f"{lost} of attempt {self.attempts[-1][0]}). Fix: see the trainer nodes' "
                    "flow runs; resume the run once it is fixed."
                )
                self._done = True
                return True
            task_logger().warning(
                "trainer node(s) %s of attempt %s were lost: the other nodes are cancelled, and "
                "a new attempt resumes from the newest checkpoint once they have ended",
                lost,
                self.attempts[-1][0],
            )
            self._restart_after = time.monotonic() + RESTART_WAIT_S
            return False
        if states and all(s is not None and s.is_completed() for s in states):
            self._done = True
        return self._done

    def result(self) -> dict:
        if self._error is not None:
            raise self._error
        attempt = self.attempts[-1][0]
        doc = self.run.read_marker(f"{SUMMARY}-{attempt}") or {}
        if doc.get("attempt") != attempt:
            raise TrainerNodesError(
                f"the trainer's nodes ended, but its rank 0 reported no summary for attempt "
                f"{attempt}. Fix: see the trainer nodes' flow runs."
            )
        return doc["summary"]


def make_trainer(config: RunConfig, run) -> Role:
    """The run's trainer: here, or one flow run per node on placement.trainer_deployment."""
    if config.placement.trainer_deployment is None:
        return LocalTrainer(config, run)
    return RemoteTrainer(config, run)
