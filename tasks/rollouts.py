"""generate_rollouts: the generator task, supervising one generator process (runtime/generator.py)."""

from __future__ import annotations

from prefect import task

from scalerl.config import RunConfig


@task(name="generate-rollouts", retries=2, retry_delay_seconds=[5, 30], cache_policy=None)
def generate_rollouts(
    config: RunConfig,
    run_id: str,
    generator_id: str = "gen0",
    max_shards: int | None = None,
    placed_as: str | None = None,
) -> dict:
    """The generator in its own process (runtime/isolated.py), supervised by this task, with its
    planned CUDA_VISIBLE_DEVICES (scalerl/placement.py); placed_as: the planned process whose
    devices it takes (a replacement, genN-rM, takes genN's)."""
    from runtime.common import process_env
    from runtime.isolated import run_isolated
    from tasks.flow_runs import current_flow_run_id

    return run_isolated(
        "runtime.generator:generator_body",
        config,
        f"generator {generator_id}",
        env=process_env(config, placed_as or generator_id),
        run_id=run_id,
        generator_id=generator_id,
        max_shards=max_shards,
        flow_run_id=current_flow_run_id(),
    )
