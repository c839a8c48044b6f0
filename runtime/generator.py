"""The generator: a persistent generator (PipelineRL, paper sec. 3.1) committing raw shards.

It samples active prompts (No-Positive-Resampling: retirements committed by update_curriculum
apply to the very next prompts), generates G completions each with interruption length control,
picks up every newly published weight version between engine steps without aborting sequences,
and commits one raw shard per batch of groups under `{generator_id}-{seq:06d}`.

Restart: the sequence number continues after the generator's last committed shard, so a
restarted generator never rewrites a committed key; groups that were in flight are simply
generated again. Generator ids must be unique per run (two writers under one id would collide,
and the store refuses the second, different, shard). It stops when the run's status leaves
"running", when every prompt is retired, or after `max_shards`.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

from runtime.common import WeightCache, open_run
from runtime.registry import GeneratorRegistration, live_generators
from scalerl.config import RunConfig
from scalerl.faults import kill_point

RAW = "raw"
STATUS_POLL_S = 1.0
LOG_EVERY_S = 5.0  # per-shard commit lines: at most this often


def _seed(*parts) -> int:
    return int.from_bytes(
        hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=4).digest(), "little"
    )


def may_start_batch(
    *,
    unread: int,
    in_flight: int,
    trainer_step: int,
    loaded: int,
    k: int,
    generators: int,
    max_queued: int | None = None,
) -> bool:
    """Backpressure: may a generator draw the prompts of its next batch now?

    Each raw shard is one trainer batch, read in commit order, so the new batch is trained at
    step trainer_step + queued at the earliest: trainer_step = the step the trainer's next
    unread shard goes to, queued = raw shards committed but not yet read by the trainer
    (`unread`) + this generator's batches drawn but not committed (`in_flight`) + one per other
    generator (their batch in progress). Its oldest token comes from version `loaded` (the
    engine's weights now) or newer, so it is at most trainer_step + queued - loaded steps old
    when trained, and is dropped unused past k (the staleness contract): start only when that
    is <= k. With `max_queued` (pipeline.max_queued_batches), the batch also needs room in the
    queue: queued + 1 <= max_queued. A trainer with nothing queued is never kept waiting,
    whatever the lag.
    """
    if unread + in_flight == 0:
        return True
    queued = unread + in_flight + (generators - 1)
    if max_queued is not None and queued + 1 > max_queued:
        return False
    return trainer_step + queued - loaded <= k


COUNT_EVERY_S = 2.0


class LeadGate:
    """The generator's StartGate (scalerl.generator): may_start_batch over the run store, with
    `generators` the live registered generators (GeneratorRegistration), wherever they run.
    trainer_step comes from the trainer's intake marker (next_step, written when it takes a
    batch; the newest published version before its first batch). Store reads are limited to one per
    `interval_s` while it refuses; when only the engine's weights are behind, it tells the
    throttled weight source to look at once."""

    def __init__(self, run, config: RunConfig, engine, weights, interval_s: float | None = None):
        # two store reads (marker + a LIST) per look: every 20 ms on a local disk, every
        # 250 ms on object storage (at most 8 requests/s per held generator, not 100)
        if interval_s is None:
            interval_s = 0.02 if run.is_local else 0.25
        self.run, self.engine, self.weights, self.interval_s = run, engine, weights, interval_s
        self.k = config.pipeline.max_off_policy_steps
        self.max_queued = config.pipeline.max_queued_batches
        self._refused_at = float("-inf")
        self._counted_at, self._count = float("-inf"), 1

    @property
    def generators(self) -> int:
        """Live registered generators, this one included (read at most every COUNT_EVERY_S)."""
        if time.monotonic() - self._counted_at >= COUNT_EVERY_S:
            asked = time.monotonic()  # as old as the listing's start, not its end
            self._count = max(1, len(live_generators(self.run)))
            self._counted_at = asked
        return self._count

    def __call__(self, in_flight: int) -> bool:
        from runtime.trainer_io import INTAKE_MARKER

        if time.monotonic() - self._refused_at < self.interval_s:
            return False
        marker = self.run.read_marker(INTAKE_MARKER) or {}
        step = marker.get("next_step")
        if step is None:  # before the trainer's first batch: the newest published version
            step = self.run.latest_weights_version() or 0
        ok = may_start_batch(
            unread=max(0, self.run.count_shards(RAW) - marker.get("shards_read", 0)),
            in_flight=in_flight,
            trainer_step=step,
            loaded=self.engine.version,
            k=self.k,
            generators=self.generators,
            max_queued=self.max_queued,
        )
        if not ok:
            self._refused_at = time.monotonic()
            if step > self.engine.version:  # the trainer has published newer weights
                self.weights.expedite()
        return ok


def _start_version(run, config: RunConfig, cache: WeightCache, lease, tries: int = 3):
    """(version, local path) the generator starts from: the newest published, held before it
    is read; one pruned between the two reads (a generator that slept through k + 2
    publishes) is skipped for the newest again."""
    from runtime.transports import published_version
    from storage.errors import NotCommittedError

    for attempt in range(tries):
        version = published_version(run, config)
        lease.hold(version)
        try:
            return version, cache.path(version)
        except NotCommittedError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def generator_body(
    config: RunConfig,
    run_id: str,
    generator_id: str = "gen0",
    max_shards: int | None = None,
    flow_run_id: str | None = None,
) -> dict:
    """What generate_rollouts runs: the generator loop until the run stops (module docstring)."""
    from runtime.generation import (
        completion_records,
        length_policy,
        sampling_settings,
        start_engine,
    )
    from runtime.isolated import notify_flow
    from runtime.logs import task_logger
    from runtime.transports import ReaderLease, transport_for
    from scalerl.curriculum import CurriculumExhausted, NoPositiveResampling
    from scalerl.generator import GeneratorSettings, generate_batches
    from storage import rollouts_from_records

    logger = task_logger()
    run = open_run(config, run_id)
    rows = {r["prompt_id"]: r for r in run.read_prompts("train").to_pylist()}
    seq = sum(1 for k in run.used_shard_keys(RAW) if k.startswith(f"{generator_id}-"))
    sampler = NoPositiveResampling(
        list(rows),
        pass_rate_threshold=config.algorithm.pass_rate_threshold,
        seed=_seed(config.data.seed, generator_id, seq),
    )
    local = tempfile.TemporaryDirectory(prefix=f"scalerl-{run_id}-w-")  # removed at the end
    cache = WeightCache(run, Path(local.name), config)
    lease = ReaderLease(run, generator_id)  # retention keeps what this generator loads
    # counted by every gate from now, before it can draw a batch (a gate reads the count at
    # most COUNT_EVERY_S late; the engine's start takes longer than that)
    registration = GeneratorRegistration(run, generator_id, flow_run_id)
    try:
        version, _ = _start_version(run, config, cache, lease)
        engine = start_engine(config, cache, version)
    except BaseException:
        local.cleanup()
        lease.release()
        registration.release()
        raise
    exhausted = False

    def sample_prompts(n: int):
        nonlocal exhausted
        committed = run.load_curriculum()
        if committed is not None:
            sampler.retire(committed[1]["sampler"]["retired"])
        try:
            return [(pid, rows[pid]["prompt"]) for pid in sampler.sample(n)]
        except CurriculumExhausted:
            exhausted = True
            raise

    last_check, stop = [0.0], [False]

    def should_stop() -> bool:
        if time.monotonic() - last_check[0] >= STATUS_POLL_S:
            last_check[0] = time.monotonic()
            stop[0] = (run.read_status() or {}).get("state", "running") != "running"
        return stop[0]

    settings = GeneratorSettings(
        groups_per_batch=config.generation.prompts_per_batch,
        samples_per_prompt=config.generation.samples_per_prompt,
        sampling=sampling_settings(config, seed=_seed(config.generation.seed, generator_id, seq)),
        length=length_policy(config, engine.tokenizer),
        max_groups=None if max_shards is None else max_shards * config.generation.prompts_per_batch,
    )
    committed, tokens, logged, logged_at = 0, 0, 0, float("-inf")
    weights = None
    # every other gate has counted this generator before its first batch is drawn
    time.sleep(max(0.0, registration.doc["started"] + COUNT_EVERY_S - time.time()))
    try:
        weights = transport_for(config).source(run, cache, version, lease, engine, generator_id)
        for batch in generate_batches(
            engine,
            sample_prompts,
            settings,
            weights=weights,
            should_stop=should_stop,
            may_start=LeadGate(run, config, engine, weights),
        ):
            if (
                stop[0]
                or len(batch.groups) < settings.groups_per_batch
                and not exhausted
                and max_shards is None
            ):
                break  # a short batch at a stop is regenerated by whoever continues the run
            key = f"{generator_id}-{seq:06d}"
            records = completion_records(
                batch.groups,
                rows,
                run_id=run_id,
                shard_id=key,
                generator_id=generator_id,
                version=engine.version,
            )
            kill_point("generator.before_commit")
            run.commit_shard(RAW, key, rollouts_from_records(records))
            notify_flow()  # the run flow's loop wakes and sends it through the stages now
            kill_point("generator.after_commit")
            seq, committed = seq + 1, committed + 1
            tokens += sum(len(r["completion_token_ids"]) for r in records)
            # a line per shard while shards are slow; at most one per LOG_EVERY_S when they
            # are fast (a tiny model commits several a second, and every line is an API call)
            if time.monotonic() - logged_at >= LOG_EVERY_S:
                logger.info(
                    "committed raw/%s: %d completions, versions %s..%s (%d shard(s) since the "
                    "last line)",
                    key,
                    len(records),
                    batch.min_version,
                    batch.max_version,
                    committed - logged,
                )
                logged_at, logged = time.monotonic(), committed
    finally:
        closing = getattr(getattr(weights, "source", None), "close", None)
        if closing is not None:  # nccl: out of the group, so the trainer stops waiting for it
            closing()
        registration.release()
        engine.close()
        local.cleanup()
        lease.release()
    if exhausted:
        logger.info("every prompt is retired: generator %s stops", generator_id)
    return {
        "generator_id": generator_id,
        "shards": committed,
        "tokens": tokens,
        "exhausted": exhausted,
    }
