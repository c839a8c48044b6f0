"""Extra generation capacity for a running ScaleRL run, from any machine that reaches its storage.

    scalerl_generate(storage_url="s3://bucket/runs", run_id="20261125-...", generator_id="hostB-0")

The run's own config (run.json) is used, so the new generator samples, generates and commits
exactly like the run's own; only `generator_id` must be unique within the run.
"""

from __future__ import annotations

from prefect import flow

from tasks.common import config_of_run
from tasks.rollouts import generate_rollouts


@flow(name="scalerl-generate", log_prints=True)
def scalerl_generate(
    storage_url: str,
    run_id: str,
    generator_id: str,
    max_shards: int | None = None,
    endpoint_url: str | None = None,
) -> dict:
    config = config_of_run(storage_url, run_id, endpoint_url)
    return generate_rollouts(config, run_id, generator_id, max_shards)
