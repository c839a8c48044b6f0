"""vLLM generation engine with step-level control and in-flight weight updates.

    engine = VLLMEngine("Qwen/Qwen3-0.6B", dtype="bfloat16", gpu_memory_utilization=0.85)
    for group in engine.generate(requests, SamplingSettings(max_new_tokens=14_336),
                                 length=policy, weights=source):
        ...

How it works (vLLM 0.32):
- One in-process ``vllm.v1.engine.llm_engine.LLMEngine`` (VLLM_ENABLE_V1_MULTIPROCESSING=0,
  async scheduling off), driven with ``add_request`` / ``step``; weight loads happen
  between steps, and vLLM labels each step's tokens with the version set at that step
  (``set_weight_version``): tagging by engine position, with no client lag.
- New weights: between two steps, ``collective_rpc("reload_weights", weights_path=DIR)``
  reloads a published safetensors directory in place on the worker (the model's own
  ``load_weights`` fails after start-up on the CPU backend, whose linear weights are
  repacked). Requests in flight are not aborted and keep their KV cache. A tied LM head
  is re-processed afterwards: reload_weights skips it and, on the CPU, its packed GEMM
  copy would keep the old weights (found by the in-flight update test).
- Prefix caching is salted with the policy version at which a sequence started, so a new
  sequence never reuses prompt KV computed by older weights, while an interrupted
  sequence's continuation reuses its own blocks.
- Segments: a request runs until the sequence's next length-control decision point
  (``max_tokens = max_tokens_before_decision()``: the thinking budget, the answer budget or
  max_new_tokens; EOS stops it anyway) and reports once, when done (FINAL_ONLY outputs keep
  the per-step cost at bare-vLLM level). Its tokens then go through the state machine; an
  interruption re-adds the sequence as prompt + generated + phrase, and a thinking section
  closed before its budget simply continues in a new segment (prefix caching makes both a
  small prefill). Per-token versions come from vLLM's weight-version spans, recorded per
  engine step, so they are exact.
- Logprobs: vLLM's ``processed_logprobs`` (the sampling distribution after temperature and
  top-p; greedy: temperature 1). FP32 LM head: ``hf_overrides={"head_dtype": "float32"}``
  when the body is bf16/fp16 (vLLM casts hidden states and head weight to fp32).
- One VLLMEngine per process: vLLM keeps process-global state (parallel groups) that a
  second in-process engine, or closing one, tears down.
- On the CPU (CI) use dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3 and
  VLLM_CPU_KVCACHE_SPACE=1 (set by default here); vLLM's torch.compile'd sampler helpers
  run eagerly there (compiling them costs ~20 s for nothing on a tiny model).
- Requests carry no per-sample seed, on any device: a seeded request whose prefill is chunked
  crashes vLLM 0.32's CPU runner, and on CUDA seeded requests put every decode step on vLLM's
  per-request sampling loop. Samples are reproducible through the engine's global seed.
- Priority scheduling: a continuation after a length-control decision is queued before new
  sequences, so its prefix is still cached when it runs (re-queued behind new sequences on a
  full KV cache it would be evicted and re-prefilled, ~14k tokens at the paper's lengths).
  On CUDA the run's placement plan sizes max_num_seqs to what the KV cache holds
  (scalerl/placement.py) and passes tensor_parallel_size (runtime/generation.py make_engine).

What both vLLM engines share (construction, the model checks, the tied-head refresh, the
segment loop) is in vllm_common.py; this module keeps how a segment goes in (add_request)
and comes out (step) of the in-process LLMEngine.
"""

from __future__ import annotations

import os
from pathlib import Path

from scalerl.engines.base import safetensors_files
from scalerl.engines.vllm_common import SegmentIO, VLLMEngineBase, refresh_tied_head


class VLLMEngine(VLLMEngineBase):
    """Step-driven vLLM with in-flight weight updates; see the module docstring. Takes the
    arguments of VLLMEngineBase (vllm_common.py)."""

    def _start(self, args: dict, version: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        # async scheduling off: exact version tags, a step's tokens come from that step
        engine = LLMEngine.from_engine_args(EngineArgs(**args, async_scheduling=False))
        engine.set_weight_version(str(version))
        return engine

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, version: int, path: str | Path) -> None:
        """Reload weights in place from a published directory; in-flight requests continue. A
        LoRA engine takes the version's adapter (vllm_common.py _stage_adapter)."""
        self._check_open()
        if self._takes_adapter(path):
            self.engine.add_lora(self._stage_adapter(version, path))
            self.engine.set_weight_version(str(version))
            self.version = version
            return
        safetensors_files(path)
        self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        self.set_version(version)

    def weight_transfer(self, method: str, **kwargs) -> None:
        """One of vLLM's weight-transfer worker calls on every worker, between two steps
        (InPlaceEngine, base.py; weights.transport = nccl: runtime/transports/nccl.py)."""
        self.engine.collective_rpc(method, kwargs=kwargs)

    def set_version(self, version: int) -> None:
        """Tag the tokens of the next steps with `version` (weights loaded by other means)."""
        if self.tied:
            self.engine.collective_rpc(refresh_tied_head)
        self.engine.set_weight_version(str(version))
        self.version = version

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.engine_core.shutdown()
            self.engine = None
        self._close_lora()

    # -- segments in and out ---------------------------------------------------------------

    def _step(self):
        if not self._on_cpu:
            return self.engine.step()
        import torch

        with torch._dynamo.config.patch(disable=True):
            return self.engine.step()

    def _submit(self, seq, sampling, salt: str) -> str:
        request_id, prompt, params, priority = self._segment(seq, sampling, salt)
        self.engine.add_request(
            request_id, prompt, params, priority=priority, lora_request=self._lora_request
        )
        return request_id

    def _cancel(self, request_ids: list[str]) -> None:
        if self.engine is not None:
            self.engine.abort_request(request_ids)

    def _segment_io(self, weights) -> SegmentIO:
        return SegmentIO(
            submit=self._submit,
            finished=lambda _held: [(out.request_id, out) for out in self._step()],
            cancel=self._cancel,
        )
