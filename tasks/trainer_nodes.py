"""The trainer over several machines (placement.trainer_deployment): one child flow run of the
deployment per node (flows/train_node.py), each running torchrun with its share of the ranks,
joined by a c10d rendezvous; the run flow supervises them like its own trainer task.

    trainer = RemoteTrainer(config, run_id); trainer.start()
    while not trainer.done(): ...        # from the run flow's loop
    summary = trainer.result()           # rank 0's summary, from the run store

- Rendezvous: placement.rendezvous (HOST:PORT), or node 0 publishes its host's address and a
  free port in the run store (marker trainer-rendezvous-ATTEMPT) and the other
  nodes wait for it. torchrun's c10d backend then assigns the ranks (rank 0 may land on any
  node; it reports the trainer's summary through the store: marker trainer-summary-ATTEMPT).
- Nothing is shared between nodes but the store: shards and weights come from it, each node
  writes its checkpoint shards into its own directory and uploads them, and rank 0 commits
  the checkpoint (scalerl/trainer/loop.py).
- Failure: a node whose flow run ends failed or crashed (its machine lost, its process
  killed) takes the attempt down: the flow cancels the other nodes' flow runs and starts a new
  attempt (a new rendezvous id), which resumes from the newest checkpoint, up to
  MAX_ATTEMPTS starts; then the run fails.
"""

from __future__ import annotations

import socket
import time
import uuid

from scalerl.config import RunConfig
from tasks.isolated import task_logger

RENDEZVOUS = "trainer-rendezvous"
SUMMARY = "trainer-summary"
MAX_ATTEMPTS = 3
RENDEZVOUS_WAIT_S = 600.0
CHECK_EVERY_S = 2.0
RESTART_WAIT_S = 120.0  # a lost attempt's nodes get this long to end before the next starts


class TrainerNodesError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _address(config: RunConfig) -> str:
    """This machine's address as the other machines see it: the source address of a route to
    the run store's endpoint or the Prefect API (a UDP connect sends nothing), else what the
    host name resolves to (127.0.1.1 on a default Debian /etc/hosts: only one machine)."""
    import os
    from urllib.parse import urlparse

    for url in (config.storage.endpoint_url, os.environ.get("PREFECT_API_URL")):
        host = urlparse(url).hostname if url else None
        if not host:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host, 9))
                return s.getsockname()[0]
        except OSError:
            continue
    return socket.gethostbyname(socket.gethostname())


def rendezvous_endpoint(config: RunConfig, run, node_rank: int, attempt: str) -> str:
    """HOST:PORT of this attempt's c10d rendezvous (module docstring)."""
    if config.placement.rendezvous:
        return config.placement.rendezvous
    marker = f"{RENDEZVOUS}-{attempt}"
    if node_rank == 0:
        endpoint = f"{_address(config)}:{free_port()}"
        run.write_marker(marker, {"attempt": attempt, "endpoint": endpoint})
        return endpoint
    deadline = time.monotonic() + RENDEZVOUS_WAIT_S
    while True:
        doc = run.read_marker(marker) or {}
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
    task_logger().info(
        "trainer node %d of %d: rendezvous %s (%s)", node_rank, role.nodes, endpoint, attempt
    )
    # a node's devices are its job's (the work pool gives the machine its GPUs; LOCAL_RANK pins one)
    return run_torchrun(config, run_id, node=role)


def report_summary(config: RunConfig, run_id: str, attempt: str, summary: dict) -> None:
    from tasks.common import open_run

    open_run(config, run_id).write_marker(
        f"{SUMMARY}-{attempt}", {"attempt": attempt, "summary": summary}
    )


class LocalTrainer:
    """The train_policy task run of this flow, behind the interface RemoteTrainer has."""

    def __init__(self, future) -> None:
        self.future = future

    @property
    def wrapped_future(self):
        return self.future.wrapped_future

    def cancel(self) -> None:
        pass  # a local trainer stops with the run's status (or stop_children)

    def done(self) -> bool:
        return self.future.wrapped_future.done()

    def result(self) -> dict:
        return self.future.result()


class RemoteTrainer:
    def __init__(self, config: RunConfig, run_id: str) -> None:
        self.config, self.run_id = config, run_id
        self.attempts: list[tuple[str, list]] = []  # (attempt id, node flow run ids)
        self._checked, self._done, self._error = float("-inf"), False, None
        self._restart_after: float | None = None  # set while a lost attempt winds down
        self.wrapped_future = None

    def start(self) -> None:
        """A new attempt: one flow run per node. Each id is recorded as it is created, so a
        failure half-way leaves no node unknown (it is cancelled with its attempt)."""
        from tasks.generator_pool import start_role

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
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return [client.read_flow_run(i).state for i in self.attempts[-1][1]]

    def cancel(self) -> None:
        from tasks.generator_pool import cancel_flow_runs

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
        from tasks.common import open_run

        if self._error is not None:
            raise self._error
        attempt = self.attempts[-1][0]
        doc = open_run(self.config, self.run_id).read_marker(f"{SUMMARY}-{attempt}") or {}
        if doc.get("attempt") != attempt:
            raise TrainerNodesError(
                f"the trainer's nodes ended, but its rank 0 reported no summary for attempt "
                f"{attempt}. Fix: see the trainer nodes' flow runs."
            )
        return doc["summary"]
