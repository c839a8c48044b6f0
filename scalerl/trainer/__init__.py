"""The persistent PipelineRL-k trainer (ScaleRL sec. 3.1): CISPO under the k-step staleness
bound, FP32 LM head, AdamW, exact checkpoint and resume.

    from scalerl.trainer import Trainer, TrainerOptions
    Trainer(cfg, run_id=..., source=..., publisher=..., checkpoints=..., metrics=...).train()

Files: batch.py (shards -> batches, staleness and wait rules), step.py (one optimizer step),
optim.py (AdamW + warmup), checkpoint.py (what a checkpoint holds), loop.py (the Trainer),
distributed.py (FSDP2 under torchrun). Storage is wired in runtime/trainer_io.py only.
"""

from scalerl.trainer.batch import Batch, BatchAssembler, ShardRejected, ShardSource
from scalerl.trainer.checkpoint import CheckpointStore, TrainerState
from scalerl.trainer.loop import (
    MetricsSink,
    NonFiniteLossError,
    Trainer,
    TrainerOptions,
    TrainSummary,
    WeightPublisher,
)
from scalerl.trainer.step import PolicyLogprobs, StepOutput, StepSpec, train_step

__all__ = [
    "Batch",
    "BatchAssembler",
    "CheckpointStore",
    "MetricsSink",
    "NonFiniteLossError",
    "PolicyLogprobs",
    "ShardRejected",
    "ShardSource",
    "StepOutput",
    "StepSpec",
    "TrainSummary",
    "Trainer",
    "TrainerOptions",
    "TrainerState",
    "WeightPublisher",
    "train_step",
]
