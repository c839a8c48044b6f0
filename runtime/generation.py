"""Glue between the run store and the engines: engine construction from the config and
Completion -> rollout record conversion (the weight sources are runtime/transports/).

No Prefect here; the generator and evaluation tasks use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runtime.common import WeightCache
from scalerl.config import RunConfig

_SHARED: dict[tuple, Any] = {}  # shared_engine's engines


@dataclass(frozen=True)
class EngineKind:
    """What the rest of the run needs to know about a generation.engine, decided here once."""

    name: str
    one_per_process: bool
    """vLLM allows one engine per process: evaluations run in a child process of their own."""
    cpu_parallel_evaluations: bool
    """On CPU, evaluations in their own processes may run side by side once training ended."""


def _transformers(config: RunConfig, path: str, **common):
    from runtime.common import accelerator
    from scalerl.engines.hf import TransformersEngine

    # TransformersEngine defaults to the CPU. On cuda each process starts with only its planned
    # devices visible (CUDA_VISIBLE_DEVICES, runtime/common.py process_env): its first is cuda:0.
    device = "cuda:0" if accelerator(config) == "cuda" else "cpu"
    return TransformersEngine(
        path, max_batch_size=config.generation.max_batch_size, device=device, **common
    )


def _step_vllm(config: RunConfig, path: str, **common):
    from scalerl.engines.vllm_engine import VLLMEngine

    return _vllm(VLLMEngine, config, path, **common)


def _async_vllm(config: RunConfig, path: str, **common):
    from scalerl.engines.vllm_async import AsyncVLLMEngine

    return _vllm(AsyncVLLMEngine, config, path, **common)


def _vllm(engine_class, config: RunConfig, path: str, **common):
    """A vLLM engine; on CUDA sized by the run's placement plan."""
    gen = config.generation
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
        from runtime.transports import transport_for

        extra.update(transport_for(config).engine_args())  # nccl: vLLM's weight transfer
    if config.model.lora is not None:  # adapters swapped in flight (scalerl/lora.py)
        extra["lora"] = config.model.lora
    return engine_class(
        path,
        gpu_memory_utilization=gen.gpu_memory_utilization,
        max_batch_size=max_seqs,
        **extra,
        seed=gen.seed,
        max_model_len=gen.max_prompt_tokens + gen.max_new_tokens,
        **common,
    )


# generation.engine -> (how to build it, its EngineKind): the one place outside the config
# validator that knows the engines by name (tests check it covers every configurable value)
ENGINES: dict[str, tuple[Callable[..., Any], EngineKind]] = {
    "transformers": (_transformers, EngineKind("transformers", False, True)),
    "vllm": (_step_vllm, EngineKind("vllm", True, False)),
    "vllm-async": (_async_vllm, EngineKind("vllm-async", True, False)),
}


def make_engine(config: RunConfig, path, version: int):
    """The configured engine on the weights at `path` (tagged as `version`)."""
    build, _ = ENGINES[config.generation.engine]
    return build(
        config,
        str(path),
        dtype=config.model.dtype,
        fp32_head=config.algorithm.fp32_lm_head,
        version=version,
    )


def start_engine(config: RunConfig, cache: WeightCache, version: int):
    """The configured engine on weights `version` from `cache`. A LoRA run's engine (model.lora)
    starts on version 0, the base model, and takes the adapter of `version` in place, as it
    takes every later one (scalerl/lora.py)."""
    if config.model.lora is None:
        return make_engine(config, cache.path(version), version)
    engine = make_engine(config, cache.path(0), version)
    engine.load_weights(version, cache.path(version))
    return engine


def engine_kind(config: RunConfig) -> EngineKind:
    return ENGINES[config.generation.engine][1]


def shared_engine(config: RunConfig, cache: WeightCache, version: int):
    """One engine per (run, engine kind) in this process, moved to `version` in place: vLLM
    takes tens of seconds to start, so evaluations reuse it instead of building a new one."""
    key = (cache.run.url, config.generation.engine)
    engine = _SHARED.get(key)
    if engine is None:
        engine = _SHARED[key] = start_engine(config, cache, version)
    elif engine.version != version:
        engine.load_weights(version, cache.path(version))
    return engine


def close_shared_engines() -> None:
    while _SHARED:
        _SHARED.popitem()[1].close()


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
