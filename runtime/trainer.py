"""The trainer process (PipelineRL-k training side, scalerl/trainer).

It consumes `filtered` shards in commit order under the k-step staleness bound, publishes weights
v+1 after every optimizer step, appends `trainer` metrics, and checkpoints atomically. It ends at
schedule.max_steps, at the compute budget, or when the run's status leaves "running" (the flow
sets that when every prompt is retired or a generator failed); it fails with RunDeletedError
when the run's directory was deleted under it (no status, no run marker), instead of waiting for
shards that can no longer come. A retried or resumed task
continues from the newest checkpoint with the same ledger of consumed shards.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from runtime.common import WeightCache, open_run
from runtime.isolated import wait_for_wake
from scalerl.config import RunConfig

TRAIN_STAGE = "filtered"
STATUS_EVERY_S = 0.5  # how often the trainer reads the run's status (a stop, a deletion)


def trainer_body(config: RunConfig, run_id: str) -> dict:
    """What train_policy runs (in every rank under torchrun): the trainer until max steps, the
    budget or a stop."""
    run = open_run(config, run_id)
    with tempfile.TemporaryDirectory(prefix=f"scalerl-{run_id}-w-") as local:
        # the policy prepare_run published as version 0, for a start without a checkpoint
        base = WeightCache(run, Path(local), config).path(0)
        return _train(config, run_id, run, base)


def _train(config: RunConfig, run_id: str, run, base: Path) -> dict:
    from runtime.logs import task_logger
    from runtime.trainer_io import TrainerIO
    from scalerl.trainer import Trainer, TrainerOptions

    checked = {"at": float("-inf"), "stop": False}

    def should_stop() -> bool:
        # the trainer asks before every poll for shards (every 10 ms to 1 s): one status read
        # per STATUS_EVERY_S at most, which on an object store is most of an idle poll's cost
        now = time.monotonic()
        if checked["stop"] or now - checked["at"] < STATUS_EVERY_S:
            return checked["stop"]
        status = run.read_status()
        if status is None and run.created_at() is None:  # the run's directory is gone
            from storage.fsio import run_deleted

            raise run_deleted(None, run.url)
        checked.update(at=now, stop=(status or {}).get("state", "running") != "running")
        return checked["stop"]

    from runtime.common import accelerator

    ranked = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun
    rank = int(os.environ["RANK"]) if ranked else None
    io = TrainerIO.over(run, stage=TRAIN_STAGE, config=config, rank=rank)
    trainer = Trainer(
        config,
        run_id=run_id,
        source=io.source,
        publisher=io.publisher,
        checkpoints=io.checkpoints,
        metrics=io.metrics,
        options=TrainerOptions(
            # one rank on cuda: its CUDA_VISIBLE_DEVICES holds its one device (ranks under
            # torchrun pin cuda:LOCAL_RANK themselves)
            device="cuda:0" if accelerator(config) == "cuda" and not ranked else "cpu",
            model_path=str(base),
            should_stop=should_stop,
            poll_interval_s=0.01,  # a shard waiting on a sleeping trainer is pipeline latency
            max_poll_interval_s=1.0,  # polls back off to this; a commit of the stages wakes it
            sleep=wait_for_wake,
        ),
    )
    summary = trainer.train()
    from runtime.common import peak_rss_mib

    task_logger().info(
        "trainer stopped at version %d (%s); peak RSS %.0f MiB",
        summary.version,
        summary.stop_reason,
        peak_rss_mib(),
    )
    return {
        "step": summary.version,
        "reason": summary.stop_reason,
        "nan_steps": summary.nan_steps,
        "ledger_entries": summary.ledger_entries,
        "stalled": summary.stalled,
    }
