"""train_policy: the persistent trainer task, supervising the trainer process or its torchrun ranks
(runtime/trainer.py)."""

from __future__ import annotations

from prefect import task

from scalerl.config import RunConfig


@task(name="train-policy", retries=1, retry_delay_seconds=[10], cache_policy=None)
def train_policy(config: RunConfig, run_id: str) -> dict:
    """The trainer in its own process (runtime/isolated.py), or as placement.trainer_ranks ranks
    under torchrun (runtime/torchrun.py), supervised by this task; on its planned devices."""
    from runtime.common import process_env

    env = process_env(config, "trainer@node0")
    if config.placement.trainer_ranks > 1:
        from runtime.torchrun import run_torchrun

        return run_torchrun(config, run_id, env=env)
    from runtime.isolated import run_isolated

    return run_isolated(  # wake: the stages wake it when they commit a filtered shard
        "runtime.trainer:trainer_body", config, "trainer", env=env, wake=True, run_id=run_id
    )
