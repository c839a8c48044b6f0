"""vLLM generation engine on ``AsyncLLM``: engine core in its own process, in-flight updates.

    engine = AsyncVLLMEngine("Qwen/Qwen3-0.6B", dtype="bfloat16", gpu_memory_utilization=0.85)
    for group in engine.generate(requests, SamplingSettings(max_new_tokens=14_336),
                                 length=policy, weights=source):
        ...
    engine.close()

The same interface and behaviour as the step-driven ``VLLMEngine`` (vllm_engine.py: length
control segments, priority scheduling, prefix-cache salt per policy version, HOLD, FP32 head,
processed logprobs, no per-request seed); only the way vLLM is driven differs.

How it works (vLLM 0.32):
- ``vllm.v1.engine.async_llm.AsyncLLM`` with vLLM's defaults: the engine core runs in its
  own process and keeps stepping on its own (no ``step()`` from here), with async
  scheduling where the platform allows it (CUDA: the next batch is scheduled while the
  current one runs; vLLM's CPU platform always turns it off).
- A synchronous API over it: the engine owns an asyncio event loop in a daemon thread and
  submits coroutines with ``asyncio.run_coroutine_threadsafe``. Every segment is one task
  running ``AsyncLLM.generate`` with FINAL_ONLY output; when it finishes, the task puts the
  output in a queue that ``generate`` (the caller's thread) waits on. Between waits (at
  most ``poll_interval_s`` apart while a WeightSource or a HOLD is pending) it polls the
  weights and the request stream, admits sequences and submits continuations.
- New weights (``load_weights``): ``pause_generation(mode="keep", clear_cache=False)``
  freezes the requests in flight (no abort; they keep their KV cache and prefix cache);
  ``collective_rpc("reload_weights", weights_path=DIR)`` reloads the published safetensors
  in place on the workers, a tied LM head is re-processed (``refresh_tied_head`` of
  vllm_common.py, run on the workers through a worker extension: vLLM only ships callables
  to another process with VLLM_ALLOW_INSECURE_SERIALIZATION); then the engine's weight
  version is set and generation resumes. The caller's generator stalls for that long (the engine too).
- Per-token versions: vLLM's weight-version spans (``CompletionOutput.weight_versions``).
  They are exact here. The engine core stamps each batch's outputs with its current
  weight version when it processes that batch's results (``EngineCore._attach_weight_
  version``, engine side, not when the client receives the tokens), and in the core
  process ``pause_scheduler(mode="keep")`` completes only once the engine has no work:
  nothing scheduled and the async-scheduling batch queue drained
  (``EngineCoreProc.has_work`` includes ``batch_queue``). So every batch run with the old
  weights is stamped before the pause returns; the reload and ``update_weight_version``
  happen while nothing is scheduled; every batch stamped afterwards was scheduled after
  ``resume_generation`` and ran with the new weights. The client-side output processor
  only turns the stamps into spans over output-token indexes, so the lag of the client's
  stream does not matter. (The in-process ``EngineCore.pause_scheduler`` does not drain
  a batch queue, but AsyncLLM always uses the core process.) The fallback of counting each
  request's tokens at the pause is therefore not needed. The CPU tests check exactness
  with async scheduling off (vLLM's CPU platform); with it on (CUDA) the argument rests
  on the batch-queue drain above.
- Environment: VLLM_CPU_KVCACHE_SPACE=1 by default. AsyncLLM always runs the core in its
  own process, but with VLLM_ENABLE_V1_MULTIPROCESSING=0 in the environment (a VLLMEngine in
  the same process sets it) vLLM's CPU platform keeps the uniprocess executor inside that
  core process ("OMP requires the MP executor"; generation measured ~15x slower on the tiny
  model), so it is set to 1 while AsyncLLM starts and restored afterwards. On the CPU the
  workers run vLLM's torch.compile'd sampler helpers eagerly, as VLLMEngine does (compiling
  them cost 26 s in the first generate on the tiny model); that is set by an RPC after
  start-up, since the workers are separate (spawned) processes.
- vLLM starts the core with the "spawn" method here: a script that creates this engine
  needs an ``if __name__ == "__main__":`` guard.
- ``close()`` cancels the tasks, shuts AsyncLLM down (engine core and worker processes are
  joined) and stops the loop thread.

Which engine: on GPUs prefer this one (async scheduling and the separate core process keep
the GPU busy while Python handles outputs and length control); on the CPU, or where weight
updates are very frequent, prefer VLLMEngine (tiny model on 2 CPU cores: ~12k vs ~7k tokens/s,
and a ~15 ms vs ~50 ms stall per weight update); to be confirmed by the engine benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from pathlib import Path

from scalerl.engines.base import HOLD_SLEEP_S, EngineError, safetensors_files
from scalerl.engines.vllm_common import SegmentIO, VLLMEngineBase, refresh_tied_head

_START_TIMEOUT_S = 1800.0
_CALL_TIMEOUT_S = 600.0
_SHUTDOWN_TIMEOUT_S = 30.0


class WorkerExtension:
    """Mixed into vLLM's workers (``worker_extension_cls``): methods callable by name through
    ``collective_rpc``, in the worker processes."""

    def scalerl_refresh_tied_head(self) -> bool:
        return refresh_tied_head(self)

    def scalerl_eager_sampler(self) -> None:
        """Run vLLM's torch.compile'd sampler helpers eagerly in this worker (CPU)."""
        import torch

        torch._dynamo.config.disable = True


class AsyncVLLMEngine(VLLMEngineBase):
    """AsyncLLM-driven vLLM with in-flight weight updates; see the module docstring. Takes the
    arguments of VLLMEngineBase (vllm_common.py)."""

    poll_interval_s = HOLD_SLEEP_S
    """Longest wait for finished segments while a WeightSource or a HOLD needs polling."""

    def _start(self, args: dict, version: int):
        """(VLLMEngineBase) Start the loop thread and AsyncLLM on it, tagged as `version`."""
        from vllm import AsyncEngineArgs

        args.setdefault("worker_extension_cls", f"{__name__}.WorkerExtension")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="AsyncVLLMEngine-loop", daemon=True
        )
        self._thread.start()
        self._tasks: dict[str, asyncio.Task] = {}  # touched only in the loop thread
        try:
            self.engine = self._call(self._launch(AsyncEngineArgs(**args)), _START_TIMEOUT_S)
            if self._on_cpu:
                self._call(self.engine.collective_rpc("scalerl_eager_sampler"))
            self._call(self.engine.update_weight_version(str(version)))
        except BaseException:
            self.close()
            raise
        return self.engine

    async def _launch(self, args):
        from vllm.v1.engine.async_llm import AsyncLLM

        # AsyncLLM runs the core in its own process; on the CPU "0" here (a VLLMEngine in this
        # process sets it) would keep vLLM's uniprocess executor in it (~15x slower there)
        before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        try:
            # built in the loop thread: its output handler and ZMQ sockets belong to this loop
            return AsyncLLM.from_engine_args(args)
        finally:
            if before is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before

    def _call(self, coro, timeout: float | None = _CALL_TIMEOUT_S):
        """Run ``coro`` on the engine's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, version: int, path: str | Path) -> None:
        """Reload weights in place from a published directory; in-flight requests continue. A
        LoRA engine takes the version's adapter (vllm_common.py _stage_adapter)."""
        self._check_open()
        if self._takes_adapter(path):
            self._call(self._load_adapter(version, self._stage_adapter(version, path)))
            self.version = version
            return
        safetensors_files(path)
        self._call(self._load(version, str(path)))
        self.version = version

    async def _load_adapter(self, version: int, request) -> None:
        engine = self.engine
        await engine.pause_generation(mode="keep", clear_cache=False)  # as _load: exact tags
        try:
            await engine.add_lora(request)
            await engine.update_weight_version(str(version))
        finally:
            await engine.resume_generation()

    async def _load(self, version: int, path: str) -> None:
        engine = self.engine
        # "keep": requests in flight stay scheduled-but-frozen, with their KV cache; the core
        # answers once its batch queue is drained (see the module docstring: exact versions)
        await engine.pause_generation(mode="keep", clear_cache=False)
        try:
            await engine.collective_rpc("reload_weights", kwargs={"weights_path": path})
            if self.tied:
                await engine.collective_rpc("scalerl_refresh_tied_head")
            await engine.update_weight_version(str(version))
        finally:
            await engine.resume_generation()

    def weight_transfer(self, method: str, **kwargs) -> None:
        """One of vLLM's weight-transfer worker calls (InPlaceEngine, base.py; weights.transport
        = nccl: runtime/transports/nccl.py). Generation pauses ("keep") at start_weight_update
        and resumes at set_version, so no step runs on half-replaced weights."""
        self._call(self._transfer(method, kwargs))

    async def _transfer(self, method: str, kwargs: dict) -> None:
        if method == "start_weight_update":
            await self.engine.pause_generation(mode="keep", clear_cache=False)
        await self.engine.collective_rpc(method, kwargs=kwargs)

    def set_version(self, version: int) -> None:
        """The weights of `version` are in (weight_transfer): tag from now on, and resume."""
        self._call(self._set_version(version))
        self.version = version

    async def _set_version(self, version: int) -> None:
        try:
            if self.tied:
                await self.engine.collective_rpc("scalerl_refresh_tied_head")
            await self.engine.update_weight_version(str(version))
        finally:
            await self.engine.resume_generation()

    def bare_reload(self, path: str | Path) -> None:
        """vLLM's reload_weights alone, with nothing of ours around it (no pause, no version):
        the floor bench/weight_sync.py compares load_weights with."""
        self._call(self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(path)}))

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        loop = getattr(self, "_loop", None)
        if loop is None or loop.is_closed():
            self._close_lora()
            return
        try:
            if engine is not None:
                with contextlib.suppress(Exception):
                    self._call(self._cancel(None), timeout=60)  # abort what is in flight
                    # AsyncLLM.shutdown stops the core before its output handler, which
                    # then logs an EngineDeadError: end the loop's tasks first
                    self._call(self._cancel_all(), timeout=10)
                engine.shutdown(timeout=_SHUTDOWN_TIMEOUT_S)
                with contextlib.suppress(Exception):
                    self._call(self._cancel_all(), timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=60)
            if not self._thread.is_alive():
                loop.close()
            self._close_lora()

    # -- requests on the loop --------------------------------------------------------------

    def _spawn(self, request_id: str, prompt: dict, params, priority: int, results) -> None:
        """(loop thread) Start one segment's task."""
        task = self._loop.create_task(self._run(request_id, prompt, params, priority, results))
        self._tasks[request_id] = task
        task.add_done_callback(lambda _, rid=request_id: self._tasks.pop(rid, None))

    async def _run(self, request_id: str, prompt: dict, params, priority: int, results) -> None:
        final = None
        try:
            async for out in self.engine.generate(
                prompt, params, request_id, priority=priority, lora_request=self._lora_request
            ):
                final = out
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the caller's thread
            results.put((request_id, e))
            return
        results.put((request_id, final))

    async def _cancel(self, request_ids: list[str] | None) -> None:
        """(loop thread) Drop segments (None: all): cancel their tasks (AsyncLLM aborts the
        requests it has) and abort any that reached the engine while being cancelled."""
        if request_ids is None:
            request_ids = list(self._tasks)
        tasks = [t for rid in request_ids if (t := self._tasks.get(rid)) is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.engine is not None and request_ids:
            await self.engine.abort(request_ids)

    async def _cancel_all(self) -> None:
        """(loop thread) End every other task on the loop: AsyncLLM's output handler, the
        engine client's output-queue task, segments."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the loop --------------------------------------------------------------------------

    def _segment_io(self, weights) -> SegmentIO:
        """Segments run as tasks on the loop (_spawn) and report through a queue of their own
        for this generate call: (request id, output | error)."""
        results: queue.SimpleQueue = queue.SimpleQueue()

        def submit(seq, sampling, salt: str) -> str:
            request_id, prompt, params, priority = self._segment(seq, sampling, salt)
            self._loop.call_soon_threadsafe(
                self._spawn, request_id, prompt, params, priority, results
            )
            return request_id

        def finished(held: bool) -> list:
            # wait for finished segments; while something needs polling, not for long
            return self._finished(
                results, self.poll_interval_s if (held or weights is not None) else 1.0
            )

        def cancel(request_ids: list[str]) -> None:
            if self.engine is not None:
                self._call(self._cancel(request_ids))

        return SegmentIO(submit, finished, cancel)

    def _finished(self, results: queue.SimpleQueue, timeout: float) -> list:
        """Segments finished so far: waits up to ``timeout`` for the first, takes the rest."""
        try:
            got = [results.get(timeout=timeout)]
        except queue.Empty:
            if self.engine is None or self.engine.errored:
                raise EngineError(
                    "the vLLM engine core died. Fix: see its log above; create a new engine."
                ) from None
            return []
        while True:
            try:
                got.append(results.get_nowait())
            except queue.Empty:
                break
        for request_id, out in got:
            if isinstance(out, BaseException):
                raise EngineError(
                    f"vLLM failed request {request_id}: {type(out).__name__}: {out}. "
                    "Fix: see the engine log above."
                ) from out
        return got
