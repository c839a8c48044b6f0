"""The trainer over several machines (placement.trainer_deployment): one child flow run of the
deployment per node (flows/train_node.py), each running torchrun with its share of the ranks,
joined by a c10d rendezvous; the run flow supervises them like its own trainer task.

    trainer = RemoteTrainer(config, run_id); trainer.start()
    while not trainer.done(): ...        # from the run flow's loop
    summary = trainer.result()           # rank 0's summary, from the run store

- Rendezvous: placement.rendezvous (HOST:PORT), or node 0 publishes its host's address and a
  free port in the run store (marker trainer-rendezvous, with the attempt id) and the other
  nodes wait for it. torchrun's c10d backend then assigns the ranks (rank 0 may land on any
  node; it reports the trainer's summary through the store: marker trainer-summary).
- Nothing is shared between nodes but the store: shards and weights come from it, each node
  writes its checkpoint shards into its own directory and uploads them, and rank 0 commits
  the checkpoint (scalerl/trainer/loop.py).
- Failure: a node whose flow run ends failed or crashed (its machine lost, its process
  killed) takes the attempt down: the flow cancels the other nodes' flow runs and starts a new
  attempt (a new rendezvous id), which resumes from the newest checkpoint, up to
  MAX_ATTEMPTS starts; then the run fails.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid

from scalerl.config import RunConfig
from tasks.flow_runs import TAGS, run_tag

RENDEZVOUS = "trainer-rendezvous"
SUMMARY = "trainer-summary"
MAX_ATTEMPTS = 3
RENDEZVOUS_WAIT_S = 600.0
CHECK_EVERY_S = 2.0


class TrainerNodesError(RuntimeError):
    pass


def _log():
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous_endpoint(config: RunConfig, run, node_rank: int, attempt: str) -> str:
    """HOST:PORT of this attempt's c10d rendezvous (module docstring)."""
    if config.placement.rendezvous:
        return config.placement.rendezvous
    if node_rank == 0:
        endpoint = f"{socket.gethostbyname(socket.gethostname())}:{_free_port()}"
        run.write_marker(RENDEZVOUS, {"attempt": attempt, "endpoint": endpoint})
        return endpoint
    deadline = time.monotonic() + RENDEZVOUS_WAIT_S
    while True:
        doc = run.read_marker(RENDEZVOUS) or {}
        if doc.get("attempt") == attempt:
            return doc["endpoint"]
        if time.monotonic() > deadline:
            raise TrainerNodesError(
                f"trainer node {node_rank}: node 0 of attempt {attempt} published no rendezvous "
                f"endpoint within {RENDEZVOUS_WAIT_S:.0f} s. Fix: check node 0's flow run, or "
                "set placement.rendezvous=HOST:PORT."
            )
        time.sleep(0.5)


def train_node(config: RunConfig, run_id: str, node_rank: int, attempt: str) -> dict:
    """One node of the trainer (what flows/train_node.py runs): its ranks under torchrun."""
    from tasks.common import open_run
    from tasks.torchrun import NodeRole, run_torchrun

    run = open_run(config, run_id)
    endpoint = rendezvous_endpoint(config, run, node_rank, attempt)
    published = config.placement.rendezvous is None  # node 0's own address: node 0 hosts
    role = NodeRole(
        node_rank, config.placement.nodes, endpoint, attempt, node_rank == 0 if published else None
    )
    _log().info(
        "trainer node %d of %d: rendezvous %s (%s)", node_rank, role.nodes, endpoint, attempt
    )
    # a node's devices are its job's (the work pool gives the machine its GPUs; LOCAL_RANK pins one)
    return run_torchrun(config, run_id, node=role)


def report_summary(config: RunConfig, run_id: str, attempt: str, summary: dict) -> None:
    from tasks.common import open_run

    open_run(config, run_id).write_marker(SUMMARY, {"attempt": attempt, "summary": summary})


class LocalTrainer:
    """The train_policy task run of this flow, behind the interface RemoteTrainer has."""

    def __init__(self, future) -> None:
        self.future = future

    @property
    def wrapped_future(self):
        return self.future.wrapped_future

    def done(self) -> bool:
        return self.future.wrapped_future.done()

    def result(self) -> dict:
        return self.future.result()


class RemoteTrainer:
    def __init__(self, config: RunConfig, run_id: str) -> None:
        self.config, self.run_id = config, run_id
        self.attempts: list[tuple[str, list]] = []  # (attempt id, node flow run ids)
        self._checked, self._done, self._error = float("-inf"), False, None
        self.wrapped_future = None

    def start(self) -> None:
        from prefect.deployments import run_deployment

        attempt = f"{self.run_id}-{len(self.attempts)}-{uuid.uuid4().hex[:6]}"
        storage, runs = self.config.storage, []
        for rank in range(self.config.placement.nodes):
            flow_run = run_deployment(
                self.config.placement.trainer_deployment,
                parameters={
                    "storage_url": storage.url,
                    "run_id": self.run_id,
                    "node_rank": rank,
                    "attempt": attempt,
                    "endpoint_url": storage.endpoint_url,
                },
                timeout=0,
                as_subflow=True,
                flow_run_name=f"{self.run_id}/trainer-node{rank}",
                tags=[*TAGS, run_tag(self.run_id), "role:trainer"],
            )
            runs.append(flow_run.id)
        self.attempts.append((attempt, runs))
        _log().info(
            "trainer attempt %s: %d node flow runs of %s",
            attempt,
            len(runs),
            self.config.placement.trainer_deployment,
        )

    def _states(self) -> list:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return [client.read_flow_run(i).state for i in self.attempts[-1][1]]

    def _cancel(self, ids) -> None:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelling

        with get_client(sync_client=True) as client:
            for i in ids:
                try:
                    state = client.read_flow_run(i).state
                    if state is None or not state.is_final():
                        client.set_flow_run_state(i, Cancelling(), force=True)
                except Exception as exc:  # noqa: BLE001 - best effort
                    _log().warning("could not cancel trainer node flow run %s (%s)", i, exc)

    def done(self) -> bool:
        if self._done:
            return True
        if time.monotonic() - self._checked < CHECK_EVERY_S:
            return False
        self._checked = time.monotonic()
        try:
            states = self._states()
        except Exception as exc:  # noqa: BLE001 - the API blinked: ask again
            _log().warning("could not read the trainer nodes' flow runs (%s)", exc)
            return False
        if any(s is not None and s.is_final() and not s.is_completed() for s in states):
            lost = [
                i
                for i, s in enumerate(states)
                if s is not None and s.is_final() and not s.is_completed()
            ]
            self._cancel(self.attempts[-1][1])
            if len(self.attempts) >= MAX_ATTEMPTS:
                self._error = TrainerNodesError(
                    f"the trainer failed {len(self.attempts)} times over its nodes (last: node(s) "
                    f"{lost} of attempt {self.attempts[-1][0]}). Fix: see the trainer nodes' "
                    "flow runs; resume the run once it is fixed."
                )
                self._done = True
                return True
            _log().warning(
                "trainer node(s) %s of attempt %s were lost: the other nodes are cancelled and "
                "a new attempt resumes from the newest checkpoint",
                lost,
                self.attempts[-1][0],
            )
            self.start()
            return False
        if states and all(s is not None and s.is_completed() for s in states):
            self._done = True
        return self._done

    def result(self) -> dict:
        from tasks.common import open_run

        if self._error is not None:
            raise self._error
        doc = open_run(self.config, self.run_id).read_marker(SUMMARY) or {}
        if doc.get("attempt") != self.attempts[-1][0]:
            raise TrainerNodesError(
                f"the trainer's nodes ended, but its rank 0 reported no summary for attempt "
                f"{self.attempts[-1][0]}. Fix: see the trainer nodes' flow runs."
            )
        return doc["summary"]
