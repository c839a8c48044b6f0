"""evaluate_policy: the evaluation task (runtime/evaluation.py does the work): every evaluation
set at one version; logs the fit set's pass rate and each set's metrics."""

from __future__ import annotations

from prefect import get_run_logger, task

from runtime.evaluation import evaluate_version
from scalerl.config import RunConfig


# No timeout_seconds: the run submits evaluations to worker threads, where Prefect's timeout
# cannot interrupt them (and it warned so on every one); EVAL_TIMEOUT_S on the process can.
# In-process evaluations (pipeline.isolation = thread, or a memory:// store) have no timeout.
@task(name="evaluate-policy", retries=2, retry_delay_seconds=[5, 30], cache_policy=None)
def evaluate_policy(config: RunConfig, run_id: str, version: int) -> dict:
    row = evaluate_version(config, run_id, version)
    logger = get_run_logger()
    logger.info(
        "eval v%d: pass rate %.3f over %d samples (set %s)",
        version,
        row["pass_rate"],
        row["samples"],
        config.evaluation.fit_set,
    )
    for name, set_row in row["sets"].items():
        logger.info("eval v%d, set %s: %s", version, name, describe_set_row(set_row))
    return row


def describe_set_row(row: dict) -> str:
    """'mean@16 0.412, pass@16 0.800 over 30 prompts x 16' from an eval_sets row."""
    metrics = [f"{k} {v:.3f}" for k, v in row.items() if "@" in k and v is not None]
    return f"{', '.join(metrics)} over {row['prompts']} prompts x {row['samples_per_prompt']}"
