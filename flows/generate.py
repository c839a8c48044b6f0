"""Extra generation capacity for a running ScaleRL run, from any machine that reaches its storage.

    scalerl_generate(storage_url="s3://bucket/runs", run_id="20261125-...", generator_id="hostB-0")

The run's own config (run.json) is used, so the new generator samples, generates and commits
exactly like the run's own; only `generator_id` must be unique within the run.
"""

from __future__ import annotations

from prefect import flow

from runtime.common import adopt_lease, config_of_run
from tasks.rollouts import generate_rollouts


@flow(name="scalerl-generate", log_prints=True)
def scalerl_generate(
    storage_url: str,
    run_id: str,
    generator_id: str,
    max_shards: int | None = None,
    endpoint_url: str | None = None,
    writer_lease: str | None = None,
) -> dict:
    """writer_lease: the run flow's lease ($SCALERL_LEASE) when the run started this generator:
    its commits then check it, so a generator of a run taken over (resumed elsewhere, retried)
    stops instead of writing beside the new writer. None for a generator added by hand."""
    adopt_lease(writer_lease)
    config = config_of_run(storage_url, run_id, endpoint_url)
    return generate_rollouts(config, run_id, generator_id, max_shards)
