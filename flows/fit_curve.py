"""The ScaleRL sigmoid fit of an existing run's held-out pass rates, with its report.

scalerl_fit_curve(storage_url="./runs", run_id="20261125-...")
"""

from __future__ import annotations

from prefect import flow

from runtime.common import config_of_run
from tasks.scaling import fit_scaling_curve


@flow(name="scalerl-fit-curve", log_prints=True)
def scalerl_fit_curve(
    storage_url: str, run_id: str, endpoint_url: str | None = None
) -> dict | None:
    config = config_of_run(storage_url, run_id, endpoint_url)
    return fit_scaling_curve(config, run_id)
