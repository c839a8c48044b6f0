"""Resume a ScaleRL run by its id: the config comes from the run's own run.json, so the Prefect
form asks only for the run id (and the storage root when it is not the default).

    scalerl_resume(run_id="20261125-153012-a1b2")              # or: scalerl resume RUN_ID
    prefect deployment run scalerl-resume/scalerl-resume -p run_id=20261125-153012-a1b2

The same run continues where it stopped (see flows/run.py: committed shards are kept, the trainer
restarts from its last checkpoint, and the curriculum from its newest intact state, first
applying again the scored shards that state lacks, so a curriculum file deleted or damaged is
rebuilt: tasks/stage_drivers.py rebuild_curriculum); this flow run is named
"scalerl-resume/RUN_ID". A finished run is left as it is.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from flows.run import scalerl_run
from runtime.common import resume_config

DEPLOYMENT = "scalerl-resume/scalerl-resume"


@flow(name="scalerl-resume", log_prints=True)
def scalerl_resume(
    run_id: str, storage_url: str = "./runs", endpoint_url: str | None = None
) -> dict:
    """Continue a stopped, failed or crashed ScaleRL run from what it committed.

    Args:
        run_id: The ScaleRL run id (e.g. 20261125-153012-a1b2; `scalerl runs ls` lists them).
        storage_url: Run store root the run lives under: s3://bucket/prefix, or a local path. A
            relative path such as the default ./runs is resolved against the worker's working
            directory (for the process worker of prefect.yaml: the project directory that
            `prefect deploy` ran in).
        endpoint_url: S3-compatible endpoint (MinIO, Ceph, R2); credentials come from the
            worker's AWS_* variables.
    """
    config, status = resume_config(run_id, storage_url, endpoint_url)
    if status.get("state") == "finished":
        get_run_logger().info(
            "run %s already finished at step %s: nothing to resume", run_id, status.get("step")
        )
        return {"run_id": run_id, **status}
    # The body of scalerl-run in this flow run: one flow run in the UI, named after the run.
    return scalerl_run.fn(config)


def resume_here(run_id: str, storage_url: str = "./runs", endpoint_url: str | None = None) -> dict:
    """What `scalerl resume` runs: scalerl_resume in this process. When PREFECT_API_URL names a
    server that has the scalerl-resume deployment, the flow run is created from it (so the UI
    lists it under the deployment, with the others) in state Pending, which no worker picks up,
    and executed here; otherwise it is a plain flow run of the same flow."""
    params = {"run_id": run_id, "storage_url": storage_url, "endpoint_url": endpoint_url}
    if os.environ.get("PREFECT_API_URL"):
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
        from prefect.flow_engine import run_flow
        from prefect.states import Pending

        try:
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name(DEPLOYMENT)
                flow_run = client.create_flow_run_from_deployment(
                    deployment.id,
                    parameters=params,
                    state=Pending(message="started by `scalerl resume`, runs in that process"),
                )
        except ObjectNotFound:  # not deployed on this server: a flow run without a deployment
            flow_run = None
        if flow_run is not None:
            return run_flow(scalerl_resume, flow_run=flow_run, parameters=params)
    return scalerl_resume(**params)
