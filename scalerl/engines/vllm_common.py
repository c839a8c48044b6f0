"""What both vLLM engines share: construction, the model checks, the tied-head refresh and
the segment loop. vLLM itself is imported lazily, inside functions.

    class MyVLLMEngine(VLLMEngineBase):
        def _start(self, args: dict, version: int): ...        # build and start vLLM
        def _segment_io(self, weights) -> SegmentIO: ...       # how a segment goes in and out
        def load_weights(self, version, path): ...
        def weight_transfer(self, method, **kwargs): ...
        def set_version(self, version): ...
        def close(self): ...

The engines (vllm_engine.py: step-driven, in process; vllm_async.py: AsyncLLM) differ only in
how vLLM is driven. What they share, and why, is told in vllm_engine.py's module docstring:
length-control segments (``run_segments``, ``finish_segment``), priority scheduling of
continuations, a prefix-cache salt per policy version, processed logprobs, the FP32 head,
no per-request seed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from scalerl.engines.base import (
    EngineError,
    InPlaceEngine,
    SamplingSettings,
    SequenceState,
    draw_requests,
    generation_over,
    open_group,
    resolve_length,
)
from scalerl.models import ModelLoadError, check_causal_lm_config, load_tokenizer


def check_model(model: str) -> None:
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


def check_lora_support(model: str) -> None:
    """Refuse (LoraError, one line), before any engine starts, a model whose vLLM
    implementation cannot serve LoRA adapters (vLLM itself would say so at start-up, after a
    run was written). A check before a run: what vLLM prints while it is first imported (a
    Triton notice on the CPU) is kept off the command's stderr, which carries the one error."""
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        from vllm.config import ModelConfig
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.interfaces import supports_lora

    from scalerl.lora import LoraError

    config = ModelConfig(model=str(model), dtype="float32")
    model_cls, arch = ModelRegistry.resolve_model_cls(config.architectures, config)
    if not supports_lora(model_cls):
        raise LoraError(
            f"vLLM cannot serve LoRA adapters for {arch} (model {model}): its implementation "
            "has no LoRA support. Fix: set generation.engine=transformers, or train the full "
            "weights (remove model.lora)."
        )


def refresh_tied_head(worker) -> bool:
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


class SegmentIO(NamedTuple):
    """How segments go in and out of one engine, for one generate call.

    submit(seq, sampling, salt) -> request id; finished(held) -> [(request id, output)] for
    the segments that ended since the last call (VLLMEngine steps its engine, the AsyncLLM
    engine waits on a results queue); cancel(request ids) drops segments in flight."""

    submit: Callable[[SequenceState, SamplingSettings, str], str]
    finished: Callable[[bool], list]
    cancel: Callable[[list[str]], None]


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


def run_segments(engine, requests, sampling, length, weights, io: SegmentIO):
    """The generate loop of both vLLM engines: admit groups (draw_requests), keep up to
    engine.max_batch_size segments in flight, put every finished segment through the length
    state machine (finish_segment) and submit the next one, poll for new weights between
    rounds, yield groups as they complete; on exit, cancel what is still in flight."""
    policy = resolve_length(length, sampling, {engine.tokenizer.eos_token_id})
    live: dict[str, tuple[SequenceState, str, int]] = {}  # id -> (seq, salt, max_tokens)
    waiting: deque[SequenceState] = deque()
    source = iter(requests)
    exhausted = False

    def add(seq: SequenceState, salt: str) -> None:
        max_tokens = seq.length.max_tokens_before_decision()
        live[io.submit(seq, sampling, salt)] = (seq, salt, max_tokens)

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
                if generation_over(exhausted, waiting, held):
                    return
                continue
            done = [
                group
                for request_id, out in io.finished(held)
                if (group := segment_done(request_id, out)) is not None
            ]
            yield from done
    finally:
        if live:
            io.cancel(list(live))


class VLLMEngineBase(InPlaceEngine):
    """Construction and the generate loop of a vLLM engine; a subclass starts vLLM
    (``_start``) and says how a segment goes in and out of it (``_segment_io``)."""

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
        self.engine = None
        model = str(model)
        check_model(model)
        self.tokenizer = load_tokenizer(model)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm.platforms import current_platform

        self._on_cpu = current_platform.is_cpu()
        overrides = dict(engine_kwargs.pop("hf_overrides", None) or {})
        self._lora_root, self._lora_request = None, None
        lora = engine_kwargs.pop("lora", None)  # scalerl.config.LoraConfig: adapters in flight
        if lora is not None:
            engine_kwargs.update(self._lora_args(lora))
        if fp32_head and dtype != "float32":
            overrides["head_dtype"] = "float32"
        self._ids = itertools.count()
        args = dict(
            model=model,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_batch_size,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager or self._on_cpu,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            logprobs_mode="processed_logprobs",
            scheduling_policy="priority",  # continuations first (_segment)
            hf_overrides=overrides,
            disable_log_stats=True,
            **engine_kwargs,
        )
        try:
            self.engine = self._start(args, version)
        except BaseException:
            self._close_lora()  # vLLM did not start: nothing will close this engine
            raise
        config = self.engine.model_config
        self.context_len = int(config.max_model_len)
        self.head_dtype = config.head_dtype
        self.max_batch_size = max_batch_size
        self.version = version
        self.tied = bool(getattr(config.hf_text_config, "tie_word_embeddings", False))

    # -- LoRA (model.lora: scalerl/lora.py) -------------------------------------------------

    def _lora_args(self, lora) -> dict:
        """vLLM's LoRA engine arguments. One adapter id (1) serves every version: a new version
        replaces its files at one path of this engine's and is reloaded in place between two
        steps, so requests in flight continue under it, their KV cache kept (as a full-weight
        reload keeps it). On the CPU one slot more than asked: vLLM 0.32's CPU LoRA kernels
        index the slots with the no-adapter index -1, which lands on the last slot."""
        import tempfile

        from scalerl.lora import vllm_lora_rank

        self._lora_root = Path(tempfile.mkdtemp(prefix="scalerl-lora-"))
        return dict(
            enable_lora=True,
            max_loras=lora.max_loras + (1 if self._on_cpu else 0),
            max_lora_rank=vllm_lora_rank(lora.rank),
        )

    def _takes_adapter(self, path: str | Path) -> bool:
        """Whether loading `path` is an adapter swap: a LoRA engine, or an adapter version
        (_stage_adapter then says which of the two does not fit)."""
        from scalerl.lora import adapter_dir

        return self._lora_root is not None or adapter_dir(path) is not None

    def _stage_adapter(self, version: int, path: str | Path):
        """The adapter of a version directory, renamed into this engine's one adapter path;
        returns the LoRARequest that reloads it in place (vLLM's load_inplace)."""
        import shutil

        from vllm.lora.request import LoRARequest

        from scalerl.lora import adapter_dir

        adapter = adapter_dir(path)
        if self._lora_root is None or adapter is None:
            raise EngineError(
                f"{path} is {'an adapter' if adapter is not None else 'a full model'} but this "
                f"engine {'serves full weights' if self._lora_root is None else 'serves LoRA adapters'}"
                ". Fix: start the engine with lora= the run's model.lora for adapter versions, "
                "without it for full ones."
            )
        current, staged = self._lora_root / "policy", self._lora_root / f".v{version}"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(adapter, staged)
        if current.exists():
            old = self._lora_root / ".old"
            shutil.rmtree(old, ignore_errors=True)
            current.rename(old)
            staged.rename(current)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staged.rename(current)
        # requests carry the plain request; the in-place one only reloads the files now
        self._lora_request = LoRARequest("policy", 1, str(current))
        return LoRARequest("policy", 1, str(current), load_inplace=True)

    def _close_lora(self) -> None:
        if getattr(self, "_lora_root", None) is not None:
            import shutil

            shutil.rmtree(self._lora_root, ignore_errors=True)

    def _start(self, args: dict, version: int) -> Any:
        """Build vLLM from the engine arguments `args`, tagged as `version`; return it."""
        raise NotImplementedError

    def _segment_io(self, weights) -> SegmentIO:
        """How segments go in and out of this engine during one generate call."""
        raise NotImplementedError

    def _check_open(self) -> None:
        if self.engine is None:
            raise EngineError(f"engine is closed. Fix: create a new {type(self).__name__}.")

    def _segment(self, seq: SequenceState, sampling: SamplingSettings, salt: str):
        """The next segment of ``seq``, up to its next length-control decision point:
        (request id, prompt, SamplingParams, priority)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

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
        return request_id, prompt, params, 0 if seq.token_ids else 1

    def _generate(self, requests, sampling, length, weights):
        self._check_open()
        yield from run_segments(
            self, requests, sampling, length, weights, self._segment_io(weights)
        )

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
