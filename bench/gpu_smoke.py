"""GPU smoke: the first checks to run on one lent GPU, without vLLM or Prefect. `make gpu-smoke`.

    PYTHONPATH=.:wheels-unpacked python bench/gpu_smoke.py --out bench/results/gpu_smoke.json
    python bench/gpu_smoke.py --cpu          # every part at tiny shapes on the CPU (CI, < 3 min)

Made for the stock image of the device machine (Python 3.12, CUDA torch, transformers, pyarrow,
numpy, pytest; no vLLM, Prefect or pydantic: pydantic's wheels are carried, README "GPU").
Nothing is installed and nothing downloaded: models are random, built from a config. Parts,
each in its own process (its own session, killed with its children when its time is up),
each reported even when another fails; their time limits add up to the budget (8 minutes):

- environment: torch, CUDA, the GPU, TF32 flags, which packages import.
- gpu_tests: the tests marked gpu that need no vLLM or Prefect, run by pytest: counts.
- fp32_head: at Qwen2.5-0.5B's head (hidden 896, vocabulary 151,936), log-probabilities of the
  FP32 head and of a bf16 head (scalerl/fp32_head.py) against float64: error, ms per chunk.
- trainer: train_step at Qwen2.5-0.5B's shape in bf16, gradient checkpointing off and on, vs
  the bare loop of bench/trainer_step.py: tokens/s, ratio, MFU, peak memory.
- fsdp_dcp: FSDP2 at world size 1 (NCCL; gloo on CPU): 3 steps equal to one process, DCP save,
  load into a fresh model, the same 4th step after restoring the RNG states.
- hf_engine: TransformersEngine in bf16 vs bare generate (bench/engine_throughput.py), an
  in-flight load_weights, and mean |log ratio| of its sampled tokens' logprobs to the trainer's.

Prints one JSON object (and writes it to --out); exit 0 when every part is ok. run_limited and
run_parts are shared with bench/gpu_suite.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
MARK = "GPU_SMOKE_RESULT "  # a part's result line on its stdout
BLOCKED = ("prefect", "vllm", "duckdb", "s3fs", "datasets", "math_verify")
# seconds per part: (GPU, --cpu); each column adds up to that mode's budget
CAPS = {
    "environment": (30, 20),
    "gpu_tests": (100, 45),
    "fp32_head": (40, 15),
    "trainer": (120, 30),
    "fsdp_dcp": (70, 30),
    "hf_engine": (120, 35),
}
BUDGET_S = {"gpu": 480.0, "cpu": 175.0}
# dense bf16 peak FLOP/s by GPU name (vendor data sheets; SXM parts)
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
# shapes and sizes per mode; the model shapes are bench/trainer_step.py's and engine_throughput's
SIZES = {
    "gpu": dict(
        head=dict(hidden=896, vocab=151_936, tokens=1024, chunks=4),
        trainer=dict(shape="qwen2-0.5b", prompts=8, samples=8, prompt_len=64, completion_len=448,
                     micro_batch_tokens=16_384, steps=3),
        fsdp=dict(shape="small", prompts=4, samples=4, prompt_len=32, completion_len=64,
                  micro_batch_tokens=1024),
        engine=dict(shape="qwen2-0.5b", prompts=16, samples=4, tokens=128, repeats=2),
    ),
    "cpu": dict(
        head=dict(hidden=64, vocab=4096, tokens=128, chunks=2),
        trainer=dict(shape="tiny", prompts=2, samples=4, prompt_len=8, completion_len=16,
                     micro_batch_tokens=256, steps=2),
        fsdp=dict(shape="tiny", prompts=2, samples=4, prompt_len=8, completion_len=16,
                  micro_batch_tokens=96),
        engine=dict(shape="tiny", prompts=2, samples=2, tokens=8, repeats=1),
    ),
}  # fmt: skip


# -- running parts: own session, time limit, the whole group killed -----------------------------


class PartTimeout(RuntimeError):
    """The part ran past its time limit; it was killed with every process it started."""


class PartFailed(RuntimeError):
    """The part's process exited with an error; the message ends with its stderr."""


def run_limited(cmd: list[str], limit_s: float, *, cwd=REPO, env=None) -> str:
    """Run `cmd` in a new session and return its stdout. However it ends, every process left in
    its process group is then killed (SIGKILL), so nothing it started (an evaluation child, an
    engine process) keeps GPU memory into the next part. Output goes to files, not pipes: a
    grandchild holding a pipe open cannot block the wait."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        deadline = time.monotonic() + limit_s
        timed_out = False
        # Wait without reaping: while the leader is a zombie its group id cannot be reused, so
        # the killpg below reaches only this part's processes.
        while not os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if timed_out:
        raise PartTimeout(f"killed after {limit_s:.0f} s: {stderr[-1500:]}")
    if code != 0:
        raise PartFailed(f"exit {code}: {stderr[-1500:]}")
    return stdout


def run_parts(
    parts: list[tuple[str, float, Callable[[float], dict]]],
    budget_s: float,
    *,
    min_part_s: float = 10.0,
    clock=time.monotonic,
) -> dict[str, dict]:
    """Run (name, cap_s, fn(limit_s) -> dict) in order; each result gets a status: ok, failed,
    timeout (ran past its limit), or skipped (less than min_part_s of the budget left). Caps
    are scaled down to fit the budget when they add up to more, so no part is starved by the
    ones before it."""
    scale = min(1.0, budget_s / max(1e-9, sum(cap for _, cap, _ in parts)))
    t0, results = clock(), {}
    for name, cap, fn in parts:
        left = budget_s - (clock() - t0)
        limit = min(cap * scale, left)
        if limit < min_part_s:
            results[name] = {
                "status": "skipped",
                "reason": f"{max(0.0, left):.0f} s of the {budget_s:.0f} s budget left",
            }
            continue
        start = clock()
        try:
            result = {"status": "ok", **fn(limit)}
        except PartTimeout as e:
            result = {"status": "timeout", "limit_s": round(limit), "error": str(e)}
        except Exception as e:  # noqa: BLE001 - every part is reported
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(clock() - start, 1)
        results[name] = result
    return results


# -- the parts (each runs in its own process: `gpu_smoke.py --part NAME`) -----------------------


def _bench(name: str):
    """A sibling bench script as a module (bench/ is not a package)."""
    sys.path.insert(0, str(REPO / "bench"))
    return __import__(name)


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _ms(fn, device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / repeats


def _absent(module: str) -> bool:
    """Whether `module` cannot be imported (not installed, or blocked as in CI)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except ImportError:
        return True


def part_environment(mode: SimpleNamespace) -> dict:
    import platform
    import warnings

    import torch
    import transformers

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "absent": {m: _absent(m) for m in BLOCKED},
    }
    with warnings.catch_warnings():  # the allow_tf32 flags are deprecated in newer torch
        warnings.simplefilter("ignore")
        info["tf32"] = {
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }
    # what the other parts import, imported here first so that a missing package is one line
    import scalerl.engines.hf  # noqa: F401
    import scalerl.trainer  # noqa: F401
    import scalerl.trainer.distributed  # noqa: F401

    if mode.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible. Fix: run with --cpu, or on a GPU.")
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "gpu_count": torch.cuda.device_count(),
            "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return info


def gpu_test_files() -> list[str]:
    """Test files with gpu-marked tests that import neither vLLM nor Prefect (nor the layers
    above runtime/, which do)."""
    found = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        text = path.read_text()
        if "mark.gpu" not in text or "tests/e2e" in path.as_posix():
            continue
        if any(word in text for word in ("vllm", "prefect", "from tasks", "from flows")):
            continue
        found.append(str(path.relative_to(REPO)))
    return found


def part_gpu_tests(mode: SimpleNamespace) -> dict:
    import xml.etree.ElementTree as ET

    files = gpu_test_files()
    xml = Path(mode.workdir) / "gpu_tests.xml"
    # no addopts: they ask for pytest-timeout, which the device image lacks (the part has a limit)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    proc = subprocess.run(
        [*cmd, "-m", "gpu", f"--junitxml={xml}", *files], cwd=REPO, capture_output=True, text=True
    )
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    result = {"files": files, "exit": proc.returncode, **n}
    result["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    if proc.returncode not in (0, 5) or n["failures"] or n["errors"]:  # 5: nothing collected
        raise RuntimeError(f"pytest: {json.dumps(result)}\n{proc.stdout[-3000:]}")
    return result


class _Head:
    """Just what scalerl/fp32_head.py asks of a model: get_output_embeddings().weight."""

    def __init__(self, weight) -> None:
        self.weight = weight

    def get_output_embeddings(self):
        return self


def part_fp32_head(mode: SimpleNamespace) -> dict:
    import torch

    from scalerl.fp32_head import logprobs_from_hidden

    s, dev = SimpleNamespace(**mode.sizes["head"]), mode.device
    g = torch.Generator().manual_seed(0)
    # logits with a spread like a trained model's (std 3); hidden states as a bf16 body emits
    weight = (torch.randn(s.vocab, s.hidden, generator=g) * 3 / s.hidden**0.5).to(dev)
    hidden = torch.randn(s.chunks, 1, s.tokens, s.hidden, generator=g).to(dev, torch.bfloat16)
    targets = torch.randint(s.vocab, (s.chunks, 1, s.tokens), generator=g).to(dev)
    heads = {"fp32": _Head(weight), "bf16": _Head(weight.to(torch.bfloat16))}
    errors: dict = {k: [] for k in heads}  # one chunk = one call: tokens <= the default chunk
    for h, t in zip(hidden, targets, strict=True):
        logits = h.double() @ weight.double().T  # (1, tokens, vocab): exact for these inputs
        exact = torch.log_softmax(logits, -1).gather(-1, t[..., None])[..., 0]
        for name, head in heads.items():
            with torch.no_grad():
                lp = logprobs_from_hidden(head, h, t, fp32_head=name == "fp32")
            errors[name].append((lp.double() - exact).abs())
    out: dict = {"hidden": s.hidden, "vocab": s.vocab, "tokens_per_chunk": s.tokens}
    for name, head in heads.items():
        err = torch.cat(errors[name], -1)
        fp32 = name == "fp32"
        grad_head = _Head(head.weight.detach().clone().requires_grad_())
        h0 = hidden[0].clone().requires_grad_()

        def forward(head=head, fp32=fp32) -> None:
            with torch.no_grad():
                logprobs_from_hidden(head, hidden[0], targets[0], fp32_head=fp32)

        def both(head=grad_head, h=h0, fp32=fp32) -> None:
            logprobs_from_hidden(head, h, targets[0], fp32_head=fp32).sum().backward()

        out[name] = {
            "mean_abs_err_vs_float64": err.mean().item(),
            "max_abs_err_vs_float64": err.max().item(),
            "forward_ms_per_chunk": round(_ms(forward, dev, 5), 3),
            "forward_backward_ms_per_chunk": round(_ms(both, dev, 3), 3),
        }
    if not out["fp32"]["mean_abs_err_vs_float64"] < out["bf16"]["mean_abs_err_vs_float64"]:
        raise AssertionError(f"the FP32 head is not closer to float64 than bf16: {out}")
    return out


def _trainer_variant(variant: str, base, table, s, device) -> dict:
    """Warm-up, then s.steps timed steps of one variant on its own copy of `base`."""
    import torch

    from scalerl.trainer.step import PolicyLogprobs, Rollouts, StepSpec, train_step

    ts, bf16 = _bench("trainer_step"), torch.bfloat16
    model = copy.deepcopy(base).to(device)
    if variant == "ours_checkpointing":
        model.gradient_checkpointing_enable()  # as scalerl/trainer/loop.py does
    if variant == "bare":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, eps=1e-15, weight_decay=0.01)
        batches = ts.bare_batches(table, s.micro_batch_tokens, device)
        r = Rollouts.from_table(table)
        adv, n_tokens = (r.rewards - r.rewards.mean()).to(device), int(r.loss_mask().sum())

        def step() -> None:
            ts.bare_step(model, opt, batches, adv, n_tokens, bf16)
    else:
        policy = PolicyLogprobs(model, fp32_head=True, compute_dtype=bf16)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, eps=1e-15, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        spec = StepSpec(micro_batch_tokens=s.micro_batch_tokens)

        def step() -> None:
            result = train_step(policy, opt, sched, table, spec, pad_token_id=0)
            if result.skipped:
                raise AssertionError(f"a non-finite step: {result.metrics}")

    step()  # warm-up; AdamW's state exists from here on
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    median = statistics.median(ts.seconds(step, device) for _ in range(s.steps))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"median_step_s": median, "peak_memory_gib": peak}


def part_trainer(mode: SimpleNamespace) -> dict:
    import gc

    import torch

    from scalerl.trainer.step import Rollouts

    ts, s, dev = _bench("trainer_step"), SimpleNamespace(**mode.sizes["trainer"]), mode.device
    device = torch.device(dev)
    base = ts.build_model(s.shape, "cpu")  # each variant gets its own copy on the device
    params = sum(p.numel() for p in base.parameters())
    vocab = base.config.vocab_size
    table = ts.build_batch(s.prompts, s.samples, s.prompt_len, s.completion_len, vocab)
    r = Rollouts.from_table(table)
    n_tokens = int(r.loss_mask().sum())
    seq_tokens = sum(r.seq_len(i) for i in range(len(r.rewards)))
    name = torch.cuda.get_device_name() if dev == "cuda" else ""
    peak = next((v for key, v in PEAK_BF16.items() if key in name), None)
    out: dict = {
        "shape": s.shape,
        "params": params,
        "completion_tokens": n_tokens,
        "sequence_tokens": seq_tokens,
        "peak_bf16_flops": peak,
        "mfu_basis": "6 x parameters x sequence tokens / median step time / dense bf16 peak",
    }
    for variant in ("bare", "ours", "ours_checkpointing"):
        got = _trainer_variant(variant, base, table, s, device)
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
        median = got["median_step_s"]
        out[variant] = {
            "median_step_s": round(median, 6),
            "tokens_per_s": round(n_tokens / median, 1),
            "mfu": round(6 * params * seq_tokens / median / peak, 4) if peak else None,
            "peak_memory_gib": None
            if got["peak_memory_gib"] is None
            else round(got["peak_memory_gib"], 2),
        }
    for variant in ("ours", "ours_checkpointing"):
        bare = out["bare"]["median_step_s"]
        out[variant]["ratio_to_bare"] = round(bare / out[variant]["median_step_s"], 3)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def part_fsdp_dcp(mode: SimpleNamespace) -> dict:
    import torch
    import torch.distributed as dist

    from scalerl.trainer.checkpoint import rng_state, set_rng_state
    from scalerl.trainer.distributed import DataParallel, load_sharded_state, save_sharded_state
    from scalerl.trainer.step import PolicyLogprobs, StepSpec, train_step

    ts, s = _bench("trainer_step"), SimpleNamespace(**mode.sizes["fsdp"])
    cuda = mode.device == "cuda"
    device = "cuda:0" if cuda else "cpu"
    port = str(_free_port())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1")
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    dp = DataParallel(rank=0, world_size=1, device=device)
    base = ts.build_model(s.shape, device)
    vocab = base.config.vocab_size
    table = ts.build_batch(s.prompts, s.samples, s.prompt_len, s.completion_len, vocab)
    spec = StepSpec(micro_batch_tokens=s.micro_batch_tokens)

    def fresh(sharded: bool):
        # float32 compute on both sides: the comparison is of the sharding, not of bf16 rounding;
        # eps 1e-8 so that a near-zero gradient's rounding cannot move a weight by a whole lr
        policy = PolicyLogprobs(copy.deepcopy(base), fp32_head=True)
        if sharded:
            policy = dp.shard(policy, torch.float32)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.01)
        return policy, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    def step(trio, sharded: bool) -> float:
        out = train_step(*trio, table, spec, pad_token_id=0, data_parallel=dp if sharded else None)
        if out.skipped:
            raise AssertionError(f"a non-finite step: {out.metrics}")
        return out.metrics["loss"]

    def weights(policy, sharded: bool) -> dict:
        # copies: on the CPU these tensors can be the live parameters, which later steps move
        state = dp.full_model_state(policy) if sharded else policy.model.state_dict()
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}

    def max_diff(a: dict, b: dict) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in a)

    start = {k: v.detach().float().cpu().clone() for k, v in base.state_dict().items()}
    single, sharded = fresh(False), fresh(True)
    loss_single = [step(single, False) for _ in range(3)]
    loss_sharded = [step(sharded, True) for _ in range(3)]
    w_single, w_sharded = weights(single[0], False), weights(sharded[0], True)
    moved = max_diff(w_single, start)
    ckpt = Path(mode.workdir) / "ckpt"
    save_sharded_state(sharded[0], sharded[1], ckpt / "dcp")
    tensors, plain = rng_state()
    torch.save(tensors, ckpt / "rng.pt")
    draws = [torch.rand(4).tolist(), torch.rand(4, device=device).tolist()]
    loss4 = step(sharded, True)
    w4 = weights(sharded[0], True)
    resumed = fresh(True)
    load_sharded_state(resumed[0], resumed[1], ckpt / "dcp")
    torch.manual_seed(1234)  # the RNG states must come from the checkpoint, not from here
    set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True), plain)
    redraws = [torch.rand(4).tolist(), torch.rand(4, device=device).tolist()]
    loss4_resumed = step(resumed, True)
    out = {
        "backend": dist.get_backend(),
        "losses_single": loss_single,
        "losses_fsdp": loss_sharded,
        "max_abs_weight_diff_after_3_steps": max_diff(w_single, w_sharded),
        "max_abs_weight_move_in_3_steps": moved,
        "step4_loss": loss4,
        "step4_loss_resumed": loss4_resumed,
        "max_abs_weight_diff_step4_resumed": max_diff(w4, weights(resumed[0], True)),
        "rng_restored": draws == redraws,
    }
    dist.destroy_process_group()
    loss_gap = max(abs(a - b) for a, b in zip(loss_single, loss_sharded, strict=True))
    if (
        loss_gap > 1e-4 * max(map(abs, loss_single))
        or out["max_abs_weight_diff_after_3_steps"] > 1e-3 * moved
    ):
        raise AssertionError(f"FSDP2 at world size 1 does not train like one process: {out}")
    # a resume without the optimizer state would differ by about one step's move (moved / 3)
    if not out["rng_restored"] or out["max_abs_weight_diff_step4_resumed"] > 1e-4 * moved:
        raise AssertionError(f"the resumed step 4 differs from the uninterrupted one: {out}")
    return out


def part_hf_engine(mode: SimpleNamespace) -> dict:
    import pyarrow as pa
    import torch

    from scalerl.engines.base import GroupRequest, SamplingSettings
    from scalerl.engines.hf import TransformersEngine
    from scalerl.models import build_tiny_model, load_policy
    from scalerl.trainer.step import PolicyLogprobs, Rollouts, collate

    et, s, dev = _bench("engine_throughput"), SimpleNamespace(**mode.sizes["engine"]), mode.device
    work = Path(mode.workdir)
    v0 = build_tiny_model(work / "v0", seed=0, **et.SHAPES[s.shape])
    v1 = build_tiny_model(work / "v1", seed=1, **et.SHAPES[s.shape])
    n_seq = s.prompts * s.samples
    engine = TransformersEngine(str(v0), dtype="bfloat16", device=dev, max_batch_size=n_seq)
    args = SimpleNamespace(**vars(s), dtype="bfloat16", device=dev)
    out: dict = {"shape": s.shape, "speed": et.bench_hf(v0, args, engine=engine)}

    # an in-flight update: v1 arrives after a few decode steps, while every sequence is live
    stalls: list[float] = []
    load = engine.load_weights

    def timed_load(version, path) -> None:
        _sync(dev)
        t0 = time.perf_counter()
        load(version, path)
        _sync(dev)
        stalls.append(time.perf_counter() - t0)

    class Arrives:
        polls = 0

        def poll(self):
            self.polls += 1
            return (1, str(v1)) if self.polls == 3 else None

    engine.load_weights = timed_load
    requests = [GroupRequest(f"p{i}", p, s.samples) for i, p in enumerate(et.prompts(s.prompts))]
    settings = SamplingSettings(max_new_tokens=s.tokens, temperature=1.0, ignore_eos=True)
    done = [c for g in engine.generate(requests, settings, weights=Arrives()) for c in g]
    spanning = sum({0, 1} <= set(c.versions) for c in done)
    out["in_flight_update"] = {
        "load_weights_s": stalls[-1] if stalls else None,
        "completions_spanning_v0_v1": spanning,
        "completions": len(done),
    }
    if engine.version != 1 or not spanning:
        raise AssertionError(f"the in-flight update did not reach live sequences: {out}")

    # the engine's logprobs of its own samples (bf16 body, FP32 head) vs the trainer's (fp32
    # master weights, bf16 autocast body, FP32 head) on the same tokens, both at v1
    done = [c for g in engine.generate(requests, settings) for c in g]
    rows = [
        {
            "group_id": c.prompt_id,
            "prompt_token_ids": c.prompt_token_ids,
            "completion_token_ids": c.token_ids,
            "logprobs": c.logprobs,
            "reward": 0.0,
        }
        for c in done
    ]
    table = pa.Table.from_pylist(rows)
    model, _ = load_policy(str(v1), dtype="float32", device=dev)
    policy = PolicyLogprobs(model, fp32_head=True, compute_dtype=torch.bfloat16)
    r = Rollouts.from_table(table)
    x = collate(r, list(range(len(done))), engine.pad_id, torch.device(dev))
    with torch.no_grad():
        trainer = policy(x["input_ids"], x["attention_mask"], x["positions"], x["targets"])
    mask = r.loss_mask().to(trainer.device)
    ratio = (trainer - x["old_logprobs"]).abs()[mask]
    out["log_ratio"] = {
        "mean_abs": ratio.mean().item(),
        "max_abs": ratio.max().item(),
        "tokens": int(mask.sum()),
    }
    if not out["log_ratio"]["mean_abs"] < 0.1:
        raise AssertionError(f"engine and trainer logprobs disagree: {out['log_ratio']}")
    return out


PARTS = {
    "environment": part_environment,
    "gpu_tests": part_gpu_tests,
    "fp32_head": part_fp32_head,
    "trainer": part_trainer,
    "fsdp_dcp": part_fsdp_dcp,
    "hf_engine": part_hf_engine,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (CI)")
    ap.add_argument("--out", help="also write the JSON report here")
    ap.add_argument("--budget-s", type=float, help="default: 480 on a GPU, 175 with --cpu")
    ap.add_argument("--parts", default=",".join(PARTS), help="a comma-separated subset")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # one part, here
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    kind = "cpu" if args.cpu else "gpu"
    if args.part:
        workdir = args.workdir or tempfile.mkdtemp(prefix=f"scalerl-gpu-smoke-{args.part}-")
        mode = SimpleNamespace(
            device="cpu" if args.cpu else "cuda", sizes=SIZES[kind], workdir=workdir
        )
        print(MARK + json.dumps(PARTS[args.part](mode)), flush=True)
        return 0
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}. Fix: choose from {', '.join(PARTS)}.")
    budget = args.budget_s or BUDGET_S[kind]
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report: dict = {"date": date, "mode": kind, "budget_s": budget}
    env = dict(os.environ)
    if args.cpu:  # one torch thread per part: on shared cores, spinning OpenMP threads cost 4x
        env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="scalerl-gpu-smoke-") as tmp:

        def part(name: str) -> Callable[[float], dict]:
            def run(limit: float) -> dict:
                workdir = Path(tmp) / name
                workdir.mkdir()
                cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name]
                cmd += ["--workdir", str(workdir), *(["--cpu"] if args.cpu else [])]
                stdout = run_limited(cmd, limit, env=env)
                lines = [x for x in stdout.splitlines() if x.startswith(MARK)]
                if not lines:
                    raise PartFailed(f"no result line in its output: {stdout[-1500:]}")
                return json.loads(lines[-1][len(MARK) :])

            return run

        chosen = [n for n in PARTS if n in args.parts.split(",")]
        col = 0 if kind == "gpu" else 1
        report["parts"] = run_parts([(n, CAPS[n][col], part(n)) for n in chosen], budget)
    report["ok"] = all(p["status"] == "ok" for p in report["parts"].values())
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
