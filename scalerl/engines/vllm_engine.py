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
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from scalerl.engines.base import (
    HOLD,
    HOLD_SLEEP_S,
    Completion,
    EngineError,
    GroupRequest,
    SamplingSettings,
    SequenceState,
    WeightSource,
    open_group,
    resolve_length,
)
from scalerl.length_control import LengthPolicy
from scalerl.models import ModelLoadError, check_causal_lm_config, load_tokenizer


def _check_model(model: str) -> None:
    """Fail early, with a clear message, on the inputs vLLM reports obscurely."""
    from transformers import AutoConfig

    local = model.startswith(("/", "./", "../", "~")) or Path(model).exists()
    if local and not (Path(model).expanduser() / "config.json").is_file():
        raise ModelLoadError(
            f"model path {model} does not exist or has no config.json. Fix: pass a local "
            "directory containing config.json and weights, or a hub id."
        )
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load a model config for {model}: {type(e).__name__}. Fix: pass an existing "
            "local directory or a hub id reachable from this machine."
        ) from e
    check_causal_lm_config(config, model)


def _refresh_tied_head(worker) -> bool:
    """Re-tie and re-process a tied LM head after reload_weights (runs on each worker).

    ``reload_weights`` finds no checkpoint tensor for a tied ``lm_head`` and keeps the layer
    as it was; the shared weight itself is refreshed through the embedding, but a head whose
    kernel was prepared from it (the CPU backend packs the weight for its GEMM) would keep
    computing logits with the old copy.
    """
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or not hasattr(head, "quant_method"):
        return False
    if embed is not None and head.weight is not embed.weight:
        head.weight = embed.weight
    head.quant_method.process_weights_after_loading(head)
    return True


def draw_requests(source, room: int, waiting: deque, open_one) -> tuple[bool, bool, list]:
    """Pull group requests from `source` until `waiting` holds `room` sequences, a HOLD comes
    (nothing to start now) or the source ends; `open_one(request)` is open_group's
    (group, sequences, group finished at once or None). Returns (source exhausted, held,
    groups finished at once). Shared by both vLLM engines."""
    done = []
    while len(waiting) < room:
        req = next(source, None)
        if req is None:
            return True, False, done
        if req is HOLD:
            return False, True, done
        _, seqs, finished = open_one(req)
        waiting.extend(seqs)
        if finished is not None:
            done.append(finished)
    return False, False, done


def finish_segment(seq: SequenceState, o, max_tokens: int, version: int, tokenizer):
    """One finished segment of a sequence (vLLM's CompletionOutput `o`, submitted with
    `max_tokens`) through the length state machine, each token tagged with the version of
    vLLM's weight-version span that produced it (`version` where none is recorded). Returns
    (the completed group or None, whether to submit the sequence's next segment)."""
    versions = [version] * len(o.token_ids)
    for span in o.weight_versions or []:  # tagged by the engine, exact (module docstrings)
        versions[span.start : span.end] = [int(span.version)] * (span.end - span.start)
    decision = None
    for i, t in enumerate(o.token_ids):
        logprob = o.logprobs[i][t].logprob if o.logprobs else float("nan")
        decision = seq.add_sampled(t, logprob, versions[i])
        if decision.finish or decision.inject:
            break  # a decision point ends the segment; nothing after it is kept
    if seq.length.done:
        return seq.group.finish(seq.completion(tokenizer)), False
    if decision is not None and decision.inject:
        return None, True  # continue after the phrase
    if o.finish_reason == "stop":  # an EOS id vLLM knows and the policy does not
        seq.force_finish("interrupted" if seq.length.interrupted else "stop")
        return seq.group.finish(seq.completion(tokenizer)), False
    if len(o.token_ids) < max_tokens:  # vLLM hit the context limit first
        seq.force_finish("length")
        return seq.group.finish(seq.completion(tokenizer)), False
    return None, True  # thinking closed before its budget: on to the next decision point


def run_segments(engine, requests, sampling, length, weights, *, submit, finished, cancel):
    """The generate loop of both vLLM engines: admit groups (draw_requests), keep up to
    engine.max_batch_size segments in flight, put every finished segment through the length
    state machine (finish_segment) and submit the next one, poll for new weights between
    rounds, yield groups as they complete; on exit, cancel what is still in flight.

    The engines differ only in how a segment goes in and comes out:
    submit(seq, sampling, salt) -> request id; finished(held) -> [(request id, output)] for
    the segments that ended since the last call (VLLMEngine steps its engine, the AsyncLLM
    engine waits on a results queue); cancel(request ids)."""
    policy = resolve_length(length, sampling, {engine.tokenizer.eos_token_id})
    live: dict[str, tuple[SequenceState, str, int]] = {}  # id -> (seq, salt, max_tokens)
    waiting: deque[SequenceState] = deque()
    source = iter(requests)
    exhausted = False

    def add(seq: SequenceState, salt: str) -> None:
        max_tokens = seq.length.max_tokens_before_decision()
        live[submit(seq, sampling, salt)] = (seq, salt, max_tokens)

    def segment_done(request_id: str, out):
        if out is None or not out.finished or request_id not in live:
            return None
        seq, salt, max_tokens = live.pop(request_id)
        group, again = finish_segment(
            seq, out.outputs[0], max_tokens, engine.version, engine.tokenizer
        )
        if again:
            add(seq, salt)
        return group

    try:
        while True:
            if weights is not None and (new := weights.poll()) is not None:
                engine.load_weights(*new)
            held = False
            if not exhausted:  # HOLD: nothing to start now; run what is live, ask again
                exhausted, held, opened = draw_requests(
                    source,
                    engine.max_batch_size - len(live),
                    waiting,
                    lambda r: open_group(r, engine.tokenizer, sampling, policy, engine.context_len),
                )
                yield from opened
            while waiting and len(live) < engine.max_batch_size:
                add(waiting.popleft(), f"v{engine.version}")
            if not live:
                if exhausted and not waiting:
                    return
                if held:
                    time.sleep(HOLD_SLEEP_S)
                continue
            done = [
                group
                for request_id, out in finished(held)
                if (group := segment_done(request_id, out)) is not None
            ]
            yield from done
    finally:
        if live:
            cancel(list(live))


class VLLMEngine:
    """Step-driven vLLM with in-flight weight updates; see the module docstring."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.85,
        max_batch_size: int = 256,
        max_model_len: int | None = None,
        fp32_head: bool = True,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        version: int = 0,
        **engine_kwargs,
    ) -> None:
        model = str(model)
        _check_model(model)
        self.tokenizer = load_tokenizer(model)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import EngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.llm_engine import LLMEngine

        self._on_cpu = current_platform.is_cpu()
        overrides = dict(engine_kwargs.pop("hf_overrides", None) or {})
        if fp32_head and dtype != "float32":
            overrides["head_dtype"] = "float32"
        args = EngineArgs(
            model=model,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_batch_size,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager or self._on_cpu,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            logprobs_mode="processed_logprobs",
            async_scheduling=False,  # exact version tags: a step's tokens come from that step
            scheduling_policy="priority",  # continuations first (_submit)
            hf_overrides=overrides,
            disable_log_stats=True,
            **engine_kwargs,
        )
        self.engine = LLMEngine.from_engine_args(args)
        self.context_len = int(self.engine.model_config.max_model_len)
        self.head_dtype = self.engine.model_config.head_dtype
        self.max_batch_size = max_batch_size
        self.version = version
        self.engine.set_weight_version(str(version))
        self._ids = itertools.count()

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, version: int, path: str | Path) -> None:
        """Reload weights in place from a published directory; in-flight requests continue."""
        if not any(Path(path).glob("*.safetensors")):
            raise EngineError(
                f"no *.safetensors in {path}. Fix: publish weights with save_pretrained(...)."
            )
        self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        if getattr(self.engine.model_config.hf_text_config, "tie_word_embeddings", False):
            self.engine.collective_rpc(_refresh_tied_head)
        self.engine.set_weight_version(str(version))
        self.version = version

    def weight_transfer(self, method: str, **kwargs) -> None:
        """One of vLLM's weight-transfer worker calls (init_weight_transfer_engine,
        start_weight_update, update_weights, finish_weight_update) on every worker, between
        two steps (weights.transport = nccl: runtime/weights_nccl.py)."""
        self.engine.collective_rpc(method, kwargs=kwargs)

    def set_version(self, version: int) -> None:
        """Tag the tokens of the next steps with `version` (weights loaded by other means)."""
        if getattr(self.engine.model_config.hf_text_config, "tie_word_embeddings", False):
            self.engine.collective_rpc(_refresh_tied_head)
        self.engine.set_weight_version(str(version))
        self.version = version

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.engine_core.shutdown()
            self.engine = None

    # -- the loop --------------------------------------------------------------------------

    def _step(self):
        if not self._on_cpu:
            return self.engine.step()
        import torch

        with torch._dynamo.config.patch(disable=True):
            return self.engine.step()

    def _submit(self, seq: SequenceState, sampling: SamplingSettings, salt: str) -> str:
        """Add the next segment of ``seq``: up to its next length-control decision point."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        n = len(seq.token_ids)
        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=seq.length.max_tokens_before_decision(),
            # No per-request seed anywhere: on CUDA a seeded request sends vLLM 0.32 to its
            # per-request sampling loop on every decode step, and on the CPU it crashes when a
            # seeded request's prefill is chunked ("CPU Generator does not use offset").
            # Samples are reproducible through the engine's global seed.
            seed=None,
            logprobs=0,
            stop_token_ids=sorted(seq.length.policy.eos_ids),
            ignore_eos=sampling.ignore_eos,
            output_kind=RequestOutputKind.FINAL_ONLY,
            detokenize=False,
        )
        request_id = f"{seq.group.request.prompt_id}/{seq.sample_index}/{next(self._ids)}"
        prompt = {"prompt_token_ids": seq.prompt_ids + seq.token_ids, "cache_salt": salt}
        # priority scheduling: a continuation (after a length-control decision) goes before
        # new sequences, so its prefix is still in the prefix cache when it is scheduled
        self.engine.add_request(request_id, prompt, params, priority=0 if n else 1)
        return request_id

    def generate(
        self,
        requests: Iterable[GroupRequest],
        sampling: SamplingSettings,
        *,
        length: LengthPolicy | None = None,
        weights: WeightSource | None = None,
    ) -> Iterator[list[Completion]]:
        if self.engine is None:
            raise EngineError("engine is closed. Fix: create a new VLLMEngine.")

        def cancel(request_ids: list[str]) -> None:
            if self.engine is not None:
                self.engine.abort_request(request_ids)

        yield from run_segments(
            self, requests, sampling, length, weights,
            submit=self._submit,
            finished=lambda _held: [(out.request_id, out) for out in self._step()],
            cancel=cancel,
        )  # fmt: skip

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
