"""The persistent PipelineRL-k trainer: consume ready shards, step, publish v+1, log, checkpoint.

    trainer = Trainer(cfg, run_id="r1", source=..., publisher=..., checkpoints=..., metrics=...)
    summary = trainer.train()       # resumes from the newest checkpoint if there is one

The four collaborators are Protocols (batch.ShardSource, WeightPublisher, MetricsSink,
checkpoint.CheckpointStore); runtime/trainer_io.py implements them over the run store, so this
package never touches storage. Versions: weights v = the policy after v optimizer steps; step v
trains policy v on completions with v - min_version <= k and publishes v + 1 (batch.py).

What happens when:
- not enough fresh groups: wait, polling every poll_interval_s, doubling up to
  max_poll_interval_s (reset when a new shard arrives); stop (checkpoint, return) when
  should_stop() says so or nothing trainable arrived for idle_timeout_s.
- every group of a batch has zero variance: no optimizer step, no new version; the groups are
  consumed (they would never help) and counted in the next metrics row.
- non-finite loss or gradient norm: step skipped (weights unchanged), counted; more than
  trainer.max_nan_steps such steps in a run -> checkpoint, then NonFiniteLossError.
- a rejected shard (foreign run, schema, corrupt, unscored): skipped, counted, in the ledger.
- checkpoints every trainer.checkpoint_every steps and at every clean stop; resume restores
  weights, AdamW, scheduler, RNG, step, ledger and the shard buffer, so training continues
  bit-identically (on CPU with deterministic algorithms).
- under torchrun (WORLD_SIZE > 1) the policy is sharded with FSDP2 (distributed.py); rank 0
  publishes, logs and checkpoints.
- publishing (trainer.publish_in_background, default on): version v + 1 goes to a background
  thread (BackgroundPublisher) as a CPU copy while the next step trains; versions stay in
  order, a checkpoint first waits for every version before it (so checkpoint v implies weights
  v), the trainer waits when a second version is ready before the first is committed, and a
  failed publish is raised on the trainer's thread.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from scalerl.config import RunConfig
from scalerl.faults import kill_point
from scalerl.models import load_policy, torch_dtype
from scalerl.stall import StallGuard
from scalerl.trainer import distributed
from scalerl.trainer.batch import (
    Batch,
    BatchAssembler,
    ShardRejected,
    ShardSource,
    check_shard,
    rollout_stats,
)
from scalerl.trainer.checkpoint import (
    CheckpointStore,
    TrainerState,
    model_dir,
    restore_training_state,
    write_checkpoint,
)
from scalerl.trainer.optim import build_optimizer, build_scheduler
from scalerl.trainer.step import PolicyLogprobs, StepOutput, StepSpec, train_step

log = logging.getLogger(__name__)


class WeightPublisher(Protocol):
    def publish(self, version: int, model, tokenizer, state_dict: dict | None = None) -> None:
        """Make weights `version` visible to the generators (atomically; same version again
        replaces it, e.g. after a resume). state_dict: full weights of a sharded model."""
        ...

    def latest_version(self) -> int | None:
        """The newest published version, None before version 0."""
        ...

    # optional: make_durable(version) -> None: the run store receives `version` now (called
    # at every checkpoint) when the transport publishes beside it (runtime/transports/)


class MetricsSink(Protocol):
    def append(self, rows: list[dict]) -> None:
        """Append metric rows (one per optimizer step)."""
        ...


class NonFiniteLossError(RuntimeError):
    """More steps with a NaN/inf loss or gradient than trainer.max_nan_steps."""


@dataclass(frozen=True)
class TrainerOptions:
    """Runtime knobs that are not part of the run's recipe."""

    device: str = "cpu"
    model_path: str | None = None  # initial weights (default: model.name_or_path)
    poll_interval_s: float = 1.0
    max_poll_interval_s: float = 30.0
    idle_timeout_s: float | None = None
    should_stop: Callable[[], bool] | None = None
    max_steps: int | None = None  # default: schedule.max_steps
    # how the trainer waits between polls; the runtime passes one that whoever commits the
    # shards can end early (runtime/isolated.py wait_for_wake), so a shard is read when it is
    # committed, not when a backed-off poll comes round
    sleep: Callable[[float], object] | None = None  # None: time.sleep


@dataclass(frozen=True)
class TrainSummary:
    version: int
    stop_reason: str  # "max_steps" | "budget" | "stopped" | "idle" | "stalled"
    nan_steps: int
    ledger_entries: int
    stalled: str | None = None  # why, when stop_reason is "stalled" (scalerl/stall.py)


class BackgroundPublisher:
    """Publishes weight versions in order on one thread, off the trainer's step: the trainer
    hands over version v (a CPU copy of the state) and trains v + 1 meanwhile. At most one
    version waits while another is being written, so the trainer blocks only when publishing
    falls a whole step behind; a failed publish is raised on the trainer's next hand-over or
    flush (the version is not visible: the store commits manifest-last)."""

    def __init__(self, publisher: WeightPublisher) -> None:
        import queue
        import threading

        self.publisher = publisher
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weight-publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure nothing later may be committed
                    self.publisher.publish(*item)
            except BaseException as e:  # noqa: BLE001 - raised on the trainer's thread
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(
                f"publishing weights failed: {type(self._error).__name__}: {self._error}. Fix: "
                "see the error; the task is retried and resumes from the last checkpoint."
            ) from self._error

    def submit(self, version: int, model, tokenizer, state: dict) -> None:
        self._raise()
        self._queue.put((version, model, tokenizer, state))

    def flush(self) -> None:
        self._queue.join()
        self._raise()

    def close(self) -> None:
        self._queue.join()
        self._queue.put(None)
        self._thread.join()


def cpu_copy(state: dict) -> dict:
    """A CPU copy of a state dict that keeps its aliasing (scalerl.models.map_tensors)."""
    from scalerl.models import map_tensors

    return map_tensors(state, lambda t: t.detach().to("cpu", copy=True))


def _checkpoint_step(local: Path) -> int:
    import json

    return int(json.loads((local / "trainer_state.json").read_text())["step"])


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        *,
        run_id: str,
        source: ShardSource,
        publisher: WeightPublisher,
        checkpoints: CheckpointStore,
        metrics: MetricsSink,
        options: TrainerOptions | None = None,
    ) -> None:
        self.cfg, self.run_id, self.opts = config, run_id, options or TrainerOptions()
        self.source, self.publisher, self.checkpoints, self.sink = (
            source,
            publisher,
            checkpoints,
            metrics,
        )
        self.spec = StepSpec.from_config(config)
        self.assembler = BatchAssembler(
            run_id,
            prompts_per_batch=config.generation.prompts_per_batch,
            samples_per_prompt=config.generation.samples_per_prompt,
            max_off_policy_steps=config.pipeline.max_off_policy_steps,
        )
        self.dp = distributed.DataParallel.from_env(config.trainer.collective_timeout_s)
        self.version, self.nan_steps, self.ledger = 0, 0, []
        self.saved: tuple | None = None  # _progress() at the last checkpoint
        self.counters: Counter[str] = Counter()  # compute spent, for schedule.compute_budget
        self.carry: Counter[str] = Counter()  # counts of batches that made no step
        self.stall = StallGuard(config.trainer.stall_batches)
        self.stall_message: str | None = None
        self.max_steps = self.opts.max_steps or config.schedule.max_steps
        self._background: BackgroundPublisher | None = None

    def train(self) -> TrainSummary:
        """The trainer's whole life; reads as the table of contents of the pipeline's back end."""
        self.start()  # resume from the newest checkpoint, or load the policy and publish v0
        if self.cfg.trainer.publish_in_background and self.is_main:
            self._background = BackgroundPublisher(self.publisher)
        try:
            summary = self._loop()
            self.flush_published()  # every version committed before the trainer reports
            return summary
        finally:
            if self._background is not None:
                self._background.close()

    def _loop(self) -> TrainSummary:
        stop_reason = "max_steps"
        while self.version < self.max_steps:
            if self.budget_spent():
                stop_reason = "budget"
                break
            batch, waited = self.next_batch()  # waits (with backoff) for P fresh whole groups
            if batch is None:
                stop_reason = "stopped" if self.stop_requested() else "idle"
                break
            out = self.step(batch)  # advantages, loss, micro-batches, clip, AdamW
            kill_point("trainer.after_step")
            self.record(batch, out)  # ledger entry for every consumed batch
            if out.empty:  # every group had zero variance: nothing to learn, no new version
                self.stall_message = self.stall.no_step(batch.table)
                if self.stall_message is not None:
                    stop_reason = "stalled"
                    log.error("the run stalls: %s", self.stall_message)
                    break
                continue
            self.stall.stepped()
            if out.skipped:
                self.count_nan_step(out)  # raises NonFiniteLossError past max_nan_steps
                continue
            self.version += 1
            self.publish()  # weights v+1 to the generators
            kill_point("trainer.after_publish")
            self.log_metrics(batch, out, waited)
            if self.version % self.cfg.trainer.checkpoint_every == 0:
                self.checkpoint()
        if self.saved != self._progress():
            self.checkpoint()  # at every clean stop that has something new to keep
        return TrainSummary(
            self.version, stop_reason, self.nan_steps, len(self.ledger), self.stall_message
        )

    # -- start and resume ----------------------------------------------------------------------

    def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="scalerl-trainer-")
        local = self._checkpoint_to_resume()
        sharded_checkpoint = local is not None and (local / distributed.DCP_DIR).is_dir()
        lora = self.cfg.model.lora
        if local is not None and lora is None:
            path = str(model_dir(local))
        else:  # a LoRA checkpoint holds the adapter alone: the base is version 0's
            path = self.opts.model_path or self.cfg.model.name_or_path
        if local is None:
            self._seed()
        on_meta = self.dp is not None and Path(path).is_dir()
        if on_meta:  # no rank holds the whole model: shards are allocated after fully_shard
            self.model, self.tokenizer = self.dp.empty_model(path)
        elif sharded_checkpoint:  # one process resuming a sharded checkpoint: DCP fills it
            self.model, self.tokenizer = _model_from_config(path, self.device)
        else:
            # fp32 master weights; under LoRA the base is frozen and stays in model.dtype, as
            # version 0 holds it (the adapters are fp32: peft's autocast_adapter_dtype)
            dtype = "float32" if lora is None else self.cfg.model.dtype
            self.model, self.tokenizer = load_policy(path, dtype=dtype, device=self.device)
        self.peft = None
        if lora is not None:
            self._attach_lora(path, local)
        if self.cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            if lora is not None:  # a frozen embedding: the checkpointed blocks need a grad input
                self.model.enable_input_require_grads()
        self.model.train()
        self.policy = PolicyLogprobs(
            self.model,
            fp32_head=self.cfg.algorithm.fp32_lm_head,
            compute_dtype=torch_dtype(self.cfg.model.dtype),
        )
        if self.dp is not None:
            self.policy = self.dp.shard(self.policy, torch_dtype(self.cfg.model.dtype))
            if on_meta:
                self.dp.materialize(self.policy)
                if not sharded_checkpoint:  # weights v0 or a single-process checkpoint's
                    self.dp.load_hf_weights(self.policy, path)
        self.optimizer = build_optimizer(self.policy.parameters(), self.cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optimizer.warmup_steps)
        if local is not None:
            self._resume(local)
        elif self._main_says(lambda: self.publisher.latest_version() is None):
            state = self._full_state()  # a collective under FSDP: every rank gathers
            if self.is_main:
                self.publisher.publish(0, self.model, self.tokenizer, state)

    def _attach_lora(self, base: str, checkpoint: Path | None) -> None:
        """Adapters into the base model (model.lora, scalerl/lora.py); their tensors from the
        checkpoint, else version 0's initial adapter (beside the base), else drawn as prepare
        draws it (a trainer started on a bare model directory)."""
        from scalerl import lora

        self.peft = lora.attach(self.model, self.cfg.model.lora, base)
        for p in lora.trained_params(self.model).values():  # fully trained: fp32 masters
            p.data = p.data.float()
        if checkpoint is not None:
            tensors, where = lora.read_adapter(model_dir(checkpoint)), "the checkpoint's adapter"
        elif lora.adapter_dir(base) is not None:
            tensors, where = lora.read_adapter(base), f"version 0's adapter in {base}"
        else:
            tensors = lora.initial_adapter(base, self.cfg.model.lora, self.cfg.trainer.seed)
            where = "the initial adapter"
        lora.copy_adapter(self.model, tensors, where)

    def _checkpoint_to_resume(self) -> Path | None:
        """The newest intact checkpoint, downloaded; None to start fresh. Under torchrun rank 0
        chooses (the store quarantines a damaged one while it looks), then the others load the
        step it chose."""

        def load(step: int | None) -> Path | None:
            if step is None:  # None: every checkpoint left was damaged (quarantined)
                return None
            return self.checkpoints.load(step, Path(self._tmp.name) / f"resume-{step}")

        if self.dp is None:
            return load(self.checkpoints.latest_step())
        local = load(self.checkpoints.latest_step()) if self.is_main else None
        step = self.dp.from_main(None if local is None else _checkpoint_step(local))
        return local if self.is_main else load(step)

    def _main_says(self, decide: Callable[[], bool]) -> bool:
        """decide() on rank 0, the same answer on every rank (one process: just decide())."""
        if self.dp is None:
            return bool(decide())
        return bool(self.dp.from_main(bool(decide()) if self.is_main else None))

    def _resume(self, local: Path) -> None:
        if (local / distributed.DCP_DIR).is_dir():  # written by ranks: model + AdamW shards
            distributed.load_sharded_state(self.policy, self.optimizer, local / distributed.DCP_DIR)
            optimizer, hook = None, None
        else:
            optimizer = self.optimizer
            hook = self.dp.optimizer_loader(self.policy, self.optimizer) if self.dp else None
        state = restore_training_state(
            local,
            optimizer=optimizer,
            scheduler=self.scheduler,
            optimizer_state_dict_hook=hook,
        )
        self.version, self.nan_steps = state.step, state.nan_steps
        self.counters, self.ledger = Counter(state.counters), list(state.ledger)
        self.assembler.restore(state.assembler, read=self.source.read)
        self.saved = self._progress()
        log.info("resumed from checkpoint %d (%d ledger entries)", state.step, len(self.ledger))

    def _seed(self) -> None:
        seed = self.cfg.trainer.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    @property
    def device(self) -> str:
        return self.dp.device if self.dp is not None else self.opts.device

    @property
    def is_main(self) -> bool:
        return self.dp is None or self.dp.rank == 0

    # -- batches -------------------------------------------------------------------------------

    def next_batch(self) -> tuple[Batch | None, float]:
        """The next batch for step `version`, waiting for shards; (None, waited) on a stop."""
        t0 = last_progress = time.monotonic()
        delay, logged = self.opts.poll_interval_s, t0 - 30.0 + 2.0  # first note after 2 s
        while True:
            if self.ingest():
                delay, last_progress = self.opts.poll_interval_s, time.monotonic()
            batch = self.assembler.take(self.version)
            if batch is not None:
                note = getattr(self.source, "note_step", None)  # optional (batch.ShardSource)
                if note is not None and self.is_main:
                    note(self.version + 1)  # unread shards now go to the next step or later
                return batch, time.monotonic() - t0
            idle = self.opts.idle_timeout_s
            quiet = time.monotonic() - last_progress
            if self._main_says(
                lambda idle=idle, quiet=quiet: (
                    self.stop_requested() or (idle is not None and quiet > idle)
                )
            ):
                return None, time.monotonic() - t0
            if time.monotonic() - logged >= 30.0:  # polls are fast; say so once per 30 s
                logged = time.monotonic()
                log.info(
                    "step %d waits for shards: %d/%d usable groups, newest generator version %s",
                    self.version,
                    self.assembler.usable_groups(self.version),
                    self.assembler.P,
                    self.assembler.newest_generator_version,
                )
            (self.opts.sleep or time.sleep)(delay)
            delay = min(2 * delay, self.opts.max_poll_interval_s)

    def ingest(self) -> bool:
        """Read new ready shards (commit order) until a batch is possible; True if any was read."""
        new = False
        keys = self.source.list_ready() if self.is_main else None
        if self.dp is not None:  # every rank reads the same shards, in the same order
            keys = self.dp.from_main(keys)
        for key in keys:
            if self.assembler.usable_groups(self.version) >= self.assembler.P:
                break
            if self.assembler.is_read(key):
                continue
            new = True
            table, rejected = None, None
            try:
                table = self.source.read(key)
                check_shard(table, self.assembler.run_id, key)  # rows of another run: rejected
            except ShardRejected as e:
                rejected = str(e)
            if self.dp is not None:
                # rejected on one rank = rejected on all; and only now, after every rank has
                # read it, may rank 0 move it to quarantine
                why = self.dp.from_main(rejected)
                if self.dp.any_true(rejected is not None) and why is None:
                    why = rejected or "rejected by another trainer rank"
                rejected = why
                if rejected is not None and self.is_main:
                    quarantine = getattr(self.source, "quarantine", None)  # optional
                    if quarantine is not None:
                        quarantine(key, rejected)
            if rejected is None:
                self.assembler.add(key, table)
            else:
                if not self.assembler.is_read(key):
                    self.assembler.reject(key, rejected)
                log.warning("skipping shard %s: %s", key, rejected)
        return new

    def _progress(self) -> tuple[int, int, int]:
        return self.version, len(self.ledger), len(self.assembler.state_dict()["shards_read"])

    def stop_requested(self) -> bool:
        return self.opts.should_stop is not None and bool(self.opts.should_stop())

    def budget_spent(self) -> bool:
        budget, unit = self.cfg.schedule.compute_budget, self.cfg.schedule.compute_unit
        if budget is None or unit == "gpu_hours":  # GPU-hours are the flow's to measure
            return False
        spent = self.version if unit == "steps" else self.counters[unit]
        return spent >= budget

    # -- the step and what follows it ---------------------------------------------------------

    def step(self, batch: Batch) -> StepOutput:
        return train_step(
            self.policy,
            self.optimizer,
            self.scheduler,
            batch.table,
            self.spec,
            pad_token_id=self._pad_id(),
            data_parallel=self.dp,
        )

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def record(self, batch: Batch, out: StepOutput) -> None:
        outcome = "zero_variance" if out.empty else "nan_skipped" if out.skipped else "trained"
        intake = batch.intake
        self.ledger.append(
            {
                "version": batch.version,
                "outcome": outcome,
                "groups": batch.shards,
                "stale_groups": intake.stale_groups,
                "shards_read": intake.shards_read,
                "shards_rejected": intake.shards_rejected,
            }
        )
        if outcome != "trained":  # these counts reach the metrics with the next real step
            self.carry.update(
                samples_offered=intake.offered,
                samples_dropped_stale=intake.dropped_stale,
                samples_duplicate=intake.duplicates,
                samples_filtered_zero_variance=batch.table.num_rows
                - out.metrics.get("samples_kept", 0),
                shards_rejected=len(intake.shards_rejected),
                shards_read=len(intake.shards_read),
            )

    def count_nan_step(self, out: StepOutput) -> None:
        self.nan_steps += 1
        log.warning("step %d: non-finite loss/grad (%s), skipped", self.version, out.metrics)
        if self.nan_steps > self.cfg.trainer.max_nan_steps:
            self.checkpoint()
            raise NonFiniteLossError(
                f"{self.nan_steps} steps had a non-finite loss or gradient norm (limit "
                f"trainer.max_nan_steps = {self.cfg.trainer.max_nan_steps}); stopped at version "
                f"{self.version} with a checkpoint. Fix: check the shards for NaN generator "
                "logprobs, lower optimizer.lr, or raise trainer.max_nan_steps."
            )

    def publish(self) -> None:
        state = self._full_state()
        if not self.is_main:
            return
        if self._background is None:
            self.publisher.publish(self.version, self.model, self.tokenizer, state)
            return
        if state is None:  # one process: a copy, since the next step changes the parameters
            state = cpu_copy(self.model.state_dict())
        self._background.submit(self.version, self.model, self.tokenizer, state)

    def flush_published(self) -> None:
        """Wait until every version handed to the background publisher is committed; raise its
        error if one failed."""
        if self._background is not None:
            self._background.flush()

    def _full_state(self) -> dict | None:
        """What a version holds when it is not the model's own state dict: under LoRA the
        adapter alone, copied (the next step changes it while it is published; the publisher
        writes it as an adapter directory); under FSDP the gathered full state."""
        if self.peft is not None:
            from scalerl.lora import adapter_state

            return cpu_copy(adapter_state(self.model))
        if self.dp is None:
            return None
        return self.dp.full_model_state(self.policy, torch_dtype(self.cfg.model.dtype))

    def log_metrics(self, batch: Batch, out: StepOutput, waited: float) -> None:
        m, intake, k = out.metrics, batch.intake, self.cfg.pipeline.max_off_policy_steps
        self.counters.update(samples=m["samples_kept"], tokens=m["tokens"])
        g = self.assembler.newest_generator_version
        row = {
            "step": self.version,
            "trained_version": batch.version,
            "time": time.time(),
            **m,
            **{f"staleness/{d}": batch.staleness.get(d, 0) for d in range(k + 1)},
            "samples_in_batch": batch.table.num_rows,
            "samples_offered": intake.offered,
            "samples_dropped_stale": intake.dropped_stale,
            "samples_duplicate": intake.duplicates,
            "samples_filtered_zero_variance": m["samples_filtered_zero_variance"],
            "shards_read": len(intake.shards_read),
            "shards_rejected": len(intake.shards_rejected),
            **rollout_stats(batch.table),
            "wait_s": waited,
            "nan_steps_total": self.nan_steps,
            "newest_generator_version": -1 if g is None else g,
            "steps_ahead": batch.version - (batch.version if g is None else g),
            "samples_pending": self.assembler.pending,
        }
        for key, value in self.carry.items():
            row[key] = row.get(key, 0) + value
        self.carry.clear()
        if self.is_main:
            self.sink.append([row])

    def checkpoint(self) -> None:
        """Under torchrun every rank writes its shards of model and AdamW state
        (torch.distributed.checkpoint) into a directory of its node, rank 0 adds the rest and
        commits it; a single process writes full states."""
        self.flush_published()  # checkpoint v is never committed before weights v
        if self.is_main and hasattr(self.publisher, "make_durable"):
            self.publisher.make_durable(self.version)  # a transport beside the store
        shared = self.dp.shared_dir("scalerl-ckpt-") if self.dp is not None else None
        try:
            local, parts = None, []
            if shared is not None:
                local = shared / f"step-{self.version}"
                distributed.save_sharded_state(
                    self.policy, self.optimizer, local / distributed.DCP_DIR
                )
                if self.dp.nodes > 1:
                    parts = self._upload_node_parts(local)
            self.saved = self._progress()  # on every rank
            if self.is_main:
                self._write_checkpoint(local, parts)
        finally:
            if shared is not None:
                self.dp.barrier()  # nobody removes the directory while rank 0 commits it
                if self.dp.local_rank == 0:  # each node's own directory
                    import shutil

                    shutil.rmtree(shared, ignore_errors=True)
        if self.is_main:
            log.info("checkpoint %d saved", self.version)

    def _upload_node_parts(self, local: Path) -> list[dict]:
        """Ranks over several nodes share no file system: each node's DCP shards are in its
        own directory. Rank 0 takes a same-step checkpoint out of use first (a republish after
        a resume), then the first rank of every other node uploads its node's shards into the
        checkpoint's entry (uncommitted), and rank 0 gets their manifest entries to commit
        with its own files."""
        if self.is_main:
            self.checkpoints.withdraw(self.version)
        self.dp.barrier()
        part: list | dict | None = None
        if self.dp.local_rank == 0 and not self.is_main:
            try:
                part = self.checkpoints.upload_part(self.version, local)
            except Exception as e:  # noqa: BLE001 - every rank must reach the gather below
                part = {"error": f"{type(e).__name__}: {e}"}
        gathered = self.dp.gather_to_main(part) or []
        failed = [p["error"] for p in gathered if isinstance(p, dict)]
        if failed:  # rank 0 fails the checkpoint (the group then stops; the task is retried)
            raise RuntimeError(
                f"a trainer node could not upload its checkpoint shards: {failed[0]}. Fix: see "
                "that node's log; the trainer is retried and resumes from the last checkpoint."
            )
        return [e for p in gathered if p for e in p]

    def _write_checkpoint(self, sharded: Path | None, parts: list[dict] | None = None) -> None:
        state = TrainerState(
            step=self.version,
            nan_steps=self.nan_steps,
            curriculum_version=self.source.curriculum_version(),
            counters=dict(self.counters),
            assembler=self.assembler.state_dict(),
            ledger=tuple(self.ledger),
        )
        with tempfile.TemporaryDirectory(prefix="scalerl-ckpt-") as tmp:
            local = write_checkpoint(
                sharded or Path(tmp) / f"step-{self.version}",
                model=self.model,
                tokenizer=self.tokenizer,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                state=state,
                sharded=sharded is not None,
                lora=self.cfg.model.lora,
            )
            if parts:
                self.checkpoints.save(self.version, local, extra=parts)
            else:
                self.checkpoints.save(self.version, local)


def _model_from_config(path: str, device: str):
    """The architecture of `path` with freshly initialised weights (a sharded checkpoint then
    overwrites them) and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from scalerl.models import load_tokenizer

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    return model.to(device), load_tokenizer(path)
