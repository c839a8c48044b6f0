"""The trainer over several machines (placement.trainer_deployment): one child flow run of the
deployment per node (flows/train_node.py), each running torchrun with its share of the ranks,
joined by a c10d rendezvous; the run flow supervises them like its own trainer task.

    train_node(config, run_id, node_rank, attempt)   # what each node's flow run runs
    (tasks/trainer_nodes.py RemoteTrainer starts and supervises the nodes' flow runs)

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

from runtime.logs import task_logger
from scalerl.config import RunConfig

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
    from runtime.common import open_run
    from runtime.torchrun import NodeRole, run_torchrun

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
    from runtime.common import open_run

    open_run(config, run_id).write_marker(
        f"{SUMMARY}-{attempt}", {"attempt": attempt, "summary": summary}
    )
