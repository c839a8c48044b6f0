"""Held-out evaluation of any version of an existing run (the latest by default).

scalerl_evaluate(storage_url="./runs", run_id="20261125-...", version=None)
"""

from __future__ import annotations

from prefect import flow

from runtime.common import config_of_run, open_run
from tasks.evaluate import evaluate_policy


@flow(name="scalerl-evaluate", log_prints=True)
def scalerl_evaluate(
    storage_url: str, run_id: str, version: int | None = None, endpoint_url: str | None = None
) -> dict:
    config = config_of_run(storage_url, run_id, endpoint_url)
    if version is None:
        version = open_run(config, run_id).latest_weights_version() or 0
    return evaluate_policy(config, run_id, version)
