"""Glue between the run store and the engines: engine construction from the config, the
store-backed weight source, and Completion -> rollout record conversion.

No Prefect here; the generator and evaluation tasks use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from runtime.common import WeightCache
from scalerl.config import RunConfig

_ENGINES: dict[tuple, Any] = {}


@dataclass(frozen=True)
class EngineKind:
    """What the rest of the run needs to know about a generation.engine, decided here once."""

    name: str
    one_per_process: bool
    """vLLM allows one engine per process: evaluations run in a child process of their own."""
    cpu_parallel_evaluations: bool
    """On CPU, evaluations in their own processes may run side by side once training ended."""


ENGINE_KINDS = {
    "transformers": EngineKind("transformers", False, True),
    "vllm": EngineKind("vllm", True, False),
    "vllm-async": EngineKind("vllm-async", True, False),
}


def engine_kind(config: RunConfig) -> EngineKind:
    return ENGINE_KINDS[config.generation.engine]


def make_engine(config: RunConfig, path, version: int):
    """The configured engine on the weights at `path` (tagged as `version`)."""
    gen, fp32 = config.generation, config.algorithm.fp32_lm_head
    if gen.engine == "transformers":
        from scalerl.engines.hf import TransformersEngine

        return TransformersEngine(
            str(path),
            dtype=config.model.dtype,
            max_batch_size=gen.max_batch_size,
            fp32_head=fp32,
            version=version,
        )
    if gen.engine == "vllm-async":
        from scalerl.engines.vllm_async import AsyncVLLMEngine as VLLMEngine
    else:
        from scalerl.engines.vllm_engine import VLLMEngine
    from runtime.common import accelerator

    max_seqs, extra = gen.max_batch_size, {}
    if accelerator(config) == "cuda":  # pragma: no cover - gpu
        # the placement plan's max_num_seqs: no more sequences than the KV cache holds at full
        # length (scalerl/placement.py), over tensor_parallel devices
        from scalerl.placement import make_plan, model_shape

        plan = make_plan(config, model_shape(str(path)), accelerator="cuda")
        max_seqs = plan.max_num_seqs
        for warning in plan.warnings:
            import logging

            logging.getLogger(__name__).warning("placement: %s", warning)
        extra["tensor_parallel_size"] = config.placement.tensor_parallel
        if config.weights.transport == "nccl":  # runtime/weights_nccl.py
            extra["weight_transfer_config"] = {"backend": "nccl"}
    return VLLMEngine(
        str(path),
        dtype=config.model.dtype,
        gpu_memory_utilization=gen.gpu_memory_utilization,
        max_batch_size=max_seqs,
        **extra,
        fp32_head=fp32,
        seed=gen.seed,
        version=version,
        max_model_len=gen.max_prompt_tokens + gen.max_new_tokens,
    )


def shared_engine(config: RunConfig, cache: WeightCache, version: int):
    """One engine per (run, engine kind) in this process, moved to `version` in place: vLLM
    takes tens of seconds to start, so evaluations reuse it instead of building a new one."""
    key = (cache.run.url, config.generation.engine)
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = make_engine(config, cache.path(version), version)
    elif engine.version != version:
        engine.load_weights(version, cache.path(version))
    return engine


def close_shared_engines() -> None:
    while _ENGINES:
        _ENGINES.popitem()[1].close()


def length_policy(config: RunConfig, tokenizer):
    from scalerl.length_control import LengthPolicy

    lc = config.length_control
    return LengthPolicy.from_tokenizer(
        tokenizer,
        max_new_tokens=config.generation.max_new_tokens,
        thinking_budget_min=lc.thinking_budget_min,
        thinking_budget_max=lc.thinking_budget_max,
        answer_budget=lc.answer_budget,
        enabled=lc.enabled,
        think_end=lc.think_end,
        phrase=lc.interruption_phrase,
    )


def sampling_settings(config: RunConfig, *, temperature: float | None = None, seed: int = 0):
    from scalerl.engines.base import SamplingSettings

    gen = config.generation
    return SamplingSettings(
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature if temperature is None else temperature,
        top_p=gen.top_p,
        seed=seed,
        max_prompt_tokens=gen.max_prompt_tokens,
    )


class StoreWeights:
    """WeightSource over the run store: the newest committed version, downloaded once. The
    engine copies each version it is handed into its live parameters, so the local copies of
    the versions before it are deleted then (WeightCache.keep_only). With a lease, the version
    is held before it is downloaded (runtime/weights.py ReaderLease); a version pruned meanwhile
    (a reader that slept through k + 2 publishes) is skipped for the next newest."""

    def __init__(self, cache: WeightCache, current: int, lease=None) -> None:
        self.cache, self.current, self.lease = cache, current, lease

    def poll(self):
        from storage.errors import NotCommittedError

        latest = self.cache.run.latest_weights_version()
        if latest is None or latest <= self.current:
            return None
        if self.lease is not None:
            self.lease.hold(latest)
        try:
            path = self.cache.path(latest)
        except NotCommittedError:  # pruned or republished meanwhile: look again next poll
            if self.lease is not None:
                self.lease.hold(self.current)
            return None
        self.current = latest
        self.cache.keep_only(latest)
        return latest, path


def weight_source(
    config: RunConfig, cache: WeightCache, current: int, lease=None, engine=None, reader="gen0"
):
    """The WeightSource of weights.transport (runtime/weights.py), throttled to suit where it
    looks: the node-local pointer every 20 ms, the store every 0.2 s on a local disk and every
    second on object storage (a request each); nccl: the control-plane marker
    (runtime/weights_nccl.py), as often as the local pointer on a local disk."""
    from runtime.weights import LocalWeights
    from scalerl.engines.base import Throttled

    if config.weights.transport == "nccl":  # pragma: no cover - gpu
        from runtime.weights_nccl import NcclWeights

        source = NcclWeights(cache.run, engine, reader, lease, config.placement.tensor_parallel)
        return Throttled(source, interval_s=0.02 if cache.run.is_local else 0.25)
    if config.weights.transport == "local":
        return Throttled(LocalWeights(cache.run, config, current, lease), interval_s=0.02)
    interval = 0.2 if cache.run.is_local else 1.0
    return Throttled(StoreWeights(cache, current, lease), interval_s=interval)


def completion_records(
    groups, rows: dict[str, dict], *, run_id: str, shard_id: str, generator_id: str, version: int
) -> list[dict]:
    """One rollout record per completion (storage.ROLLOUT_SCHEMA), groups numbered in the shard."""
    records = []
    for j, group in enumerate(groups):
        for c in group:
            row = rows[c.prompt_id]
            records.append(
                {
                    "run_id": run_id,
                    "shard_id": shard_id,
                    "prompt_id": c.prompt_id,
                    "group_id": f"{shard_id}-g{j:04d}",
                    "sample_index": c.sample_index,
                    "task": row["task"],
                    "prompt": row["prompt"],
                    "prompt_token_ids": c.prompt_token_ids,
                    "answer": row["answer"],
                    "completion": c.text,
                    "completion_token_ids": c.token_ids,
                    "logprobs": c.logprobs,
                    "versions": c.versions,
                    "sampled": c.sampled,
                    # A completion without tokens (prompt over budget) is tagged with the engine's version.
                    "min_version": c.min_version if c.versions else version,
                    "max_version": c.max_version if c.versions else version,
                    "finish_reason": c.finish_reason,
                    "thinking_tokens": c.thinking_tokens,
                    "answer_tokens": c.answer_tokens,
                    "generator_id": generator_id,
                    "started_at": c.started_at,
                    "finished_at": c.finished_at or time.time(),
                }
            )
    return records
