"""evaluate_policy: the evaluation task (runtime/evaluation.py does the work)."""

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
    get_run_logger().info(
        "eval v%d: pass rate %.3f over %d samples", version, row["pass_rate"], row["samples"]
    )
    return row
