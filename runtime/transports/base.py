"""The one interface every weight transport implements (config `weights.transport`).

    transport = transport_for(config)            # runtime/transports/__init__.py picks it once
    publisher = transport.publisher(run, dtype)  # the trainer's side
    source = transport.source(run, cache, v, lease, engine, reader)  # a generator's side

A transport answers every question the rest of the pipeline has about how weights travel, so
no other module looks at the transport's name: what the trainer publishes with, what a
generator polls, which versions the store receives (its durability policy), what the engine
must be built with, where a reader finds a version without downloading it, what it needs of
the machine, and what it leaves behind when the run ends. A new transport is a subclass here
plus its config variant (scalerl/config.py), registered in the factory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from scalerl.config import RunConfig
from storage import Run


class WeightTransport(ABC):
    """How policy version v travels from the trainer to the generators and the evaluations.
    The defaults are the store's: the run store is where every version can be found."""

    name: ClassVar[str]
    """weights.transport's value for this transport (the publish ledger records it)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    @abstractmethod
    def publisher(self, run: Run, dtype: str | None = None):
        """The trainer's WeightPublisher (scalerl.trainer.loop): publish(version, model,
        tokenizer, state_dict), latest_version(), make_durable(version). dtype: the
        generators' (default model.dtype)."""

    @abstractmethod
    def source(self, run: Run, cache, current: int, lease=None, engine=None, reader="gen0"):
        """A generator's WeightSource (scalerl.engines.base), throttled to suit where it looks.
        cache: its runtime.common.WeightCache; current: the version its engine has; lease: its
        ReaderLease (held before a version is read); engine: the engine it feeds (a transport
        that pushes the weights into the engine itself needs it); reader: its id."""

    @abstractmethod
    def durable(self, version: int) -> bool:
        """Whether the run store receives `version` when it is published."""

    def published_version(self, run: Run) -> int | None:
        """The newest version the generators can have."""
        return run.latest_weights_version()

    def local_path(self, run: Run, version: int) -> Path | None:
        """Where a reader on this machine finds `version` without downloading it, or None."""
        return None

    def engine_args(self) -> dict:
        """Extra keyword arguments of the vLLM engine this transport feeds."""
        return {}

    def check(self, accelerator: str) -> None:
        """Refuse (ValueError, one line with the fix) a machine this transport cannot work on;
        accelerator: 'cuda' or 'cpu' (runtime.common.accelerator)."""
        return None  # the store's and the local directory's: any machine

    def end_of_run(self, run: Run) -> None:
        """Clean up what the transport leaves behind when the run ends (finished, stopped,
        stalled, failed); the store keeps every version a resume or an evaluation needs."""
        return None  # the store's: nothing beside it


def durable_beside_store(config: RunConfig, version: int) -> bool:
    """The durability policy of a transport that carries every version beside the store: the
    store receives version 0 (the base, which a trainer without a checkpoint starts from), every
    weights.durable_every-th and every evaluation version. Checkpoint versions are made durable
    by the checkpoint itself (make_durable)."""
    return (
        version == 0
        or version % config.weights.durable_every == 0
        or version % config.evaluation.every_steps == 0
    )
