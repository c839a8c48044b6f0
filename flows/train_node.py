"""One node of the trainer over several machines (placement.trainer_deployment): what the run
starts once per node, as a child flow run on the deployment's work pool.

    scalerl_train_node(storage_url="s3://bucket/runs", run_id="...", node_rank=0, attempt="...")

The run's own config (run.json) is used; the node runs placement.trainer_ranks / nodes ranks
under torchrun, joined to the other nodes by a c10d rendezvous (tasks/trainer_nodes.py).
"""

from __future__ import annotations

from prefect import flow

from runtime.common import adopt_lease, config_of_run
from runtime.trainer_node import train_node


@flow(name="scalerl-train-node", log_prints=True)
def scalerl_train_node(
    storage_url: str,
    run_id: str,
    node_rank: int,
    attempt: str,
    endpoint_url: str | None = None,
    writer_lease: str | None = None,
) -> dict:
    """writer_lease: the run flow's lease; the node's commits check it (a node of a run taken
    over stops writing)."""
    adopt_lease(writer_lease)
    config = config_of_run(storage_url, run_id, endpoint_url)
    return train_node(config, run_id, node_rank, attempt)
