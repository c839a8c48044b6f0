"""Child process of evaluate_policy for vLLM runs: `python -m runtime.eval_child RUN_ID VERSION`
with the RunConfig JSON on stdin. Commits the eval shards of VERSION (one per evaluation set) and exits (tasks/evaluate.py)."""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from runtime.isolated import watch_parents

    # Exit when the evaluating process is gone (killed with its part, its task, a SIGKILLed
    # run): nothing else would end this process, and it holds an engine's GPU memory.
    watch_parents(os.getppid())
    from runtime.evaluation import generate_eval_shards
    from runtime.generation import close_shared_engines
    from scalerl.config import validate_config

    run_id, version = argv[0], int(argv[1])
    config = validate_config(json.loads(sys.stdin.read()))
    if config.placement.evaluation_devices is None:
        # beside gen0's engine on its device: the evaluation's own share (scalerl plan's view);
        # on devices of its own (placement.evaluation_devices) it takes the generators' share
        config.generation.gpu_memory_utilization = config.evaluation.gpu_memory_utilization
    if config.evaluation.nice:  # off the training path: its CPU work yields to the generators'
        os.nice(config.evaluation.nice)
    try:
        generate_eval_shards(config, run_id, version)
    finally:
        close_shared_engines()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
