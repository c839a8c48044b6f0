"""Benchmark: generated tokens/s of our engines vs the bare libraries, same model and work.

Run:  .venv/bin/python bench/engine_throughput.py [--engines hf,vllm] [--prompts 48]
          [--samples 16] [--tokens 32] [--threads 1] [--model-shape tiny|qwen2-0.5b]

Pairs, each timed on the same prompts with fixed lengths (every sample generates exactly
--tokens tokens: ignore_eos on both sides), sampling at temperature 1, after one warm-up:
- TransformersEngine.generate (continuous batching, FP32 head, per-token logprobs and
  versions, length state machine) vs bare ``model.generate`` on the same left-padded batch
  (no logprobs).
- VLLMEngine.generate (step loop, per-token logprobs, version tags) vs bare
  ``vllm.LLM.generate`` with ``logprobs=0`` (the same work: RL needs the logprobs), plus the
  bare call without logprobs for reference. Each vLLM side runs in its own process (two
  engines in one process would each ask for --gpu-memory-utilization of the card, and vLLM
  refuses the second).
The transformers pair is interleaved (ours, bare, ours, bare); the best of --repeats is kept.

--model-shape qwen2-0.5b builds a random model with Qwen2-0.5B's shape (24 layers, hidden
896, 14 heads / 2 KV heads, vocab 151,936): GPU use; on a CPU it is very slow. On a GPU pass
--dtype bfloat16 (FP32 head on both sides of the vLLM pair via head_dtype).

Prints one JSON object: tokens/s per side and ours/bare ratios (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# vLLM logs to stdout by default; this script's stdout is one JSON object.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

from scalerl.engines.base import GroupRequest, SamplingSettings
from scalerl.models import build_tiny_model

SHAPES = {
    "tiny": dict(hidden_size=128, layers=2, heads=2),
    "qwen2-0.5b": dict(
        hidden_size=896, layers=24, heads=14, kv_heads=2, intermediate_size=4864, vocab_size=151_936
    ),
}


def prompts(n: int) -> list[str]:
    return [f"Question {i}: what is {i} * {i + 3}? " * (1 + i % 4) for i in range(n)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_hf(model_dir: Path, args, engine=None) -> dict:
    """The transformers pair; `engine`: a TransformersEngine of model_dir already loaded
    (bench/gpu_smoke.py goes on using it), else one is made."""
    from scalerl.engines.hf import TransformersEngine

    n_seq = args.prompts * args.samples
    if engine is None:
        engine = TransformersEngine(
            str(model_dir), dtype=args.dtype, device=args.device, max_batch_size=n_seq
        )
    model, tok = engine.model, engine.tokenizer
    reqs = [GroupRequest(f"p{i}", p, args.samples) for i, p in enumerate(prompts(args.prompts))]
    settings = SamplingSettings(max_new_tokens=args.tokens, temperature=1.0, ignore_eos=True)

    def ours() -> int:
        return sum(len(c.token_ids) for g in engine.generate(reqs, settings) for c in g)

    tok.padding_side = "left"
    texts = [p for p in prompts(args.prompts) for _ in range(args.samples)]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)

    def bare() -> int:
        with torch.inference_mode():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                pad_token_id=tok.pad_token_id,
            )
        return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]

    assert ours() == bare() == n_seq * args.tokens  # warm-up, and equal work
    t_ours, t_bare = [], []
    for _ in range(args.repeats):
        t_ours.append(timed(ours))
        t_bare.append(timed(bare))
    tokens = n_seq * args.tokens
    return {
        "ours_tokens_per_s": tokens / min(t_ours),
        "bare_tokens_per_s": tokens / min(t_bare),
        "ratio": min(t_bare) / min(t_ours),
        "tokens": tokens,
    }


def bench_vllm(model_dir: Path, args) -> dict:
    """Each side in its own process, one after the other: two vLLM engines in one process
    each ask for --gpu-memory-utilization of the card, and vLLM's start-up check refuses the
    second (the first holds its share plus its CUDA context). So the rounds are not interleaved
    across the sides; each side keeps its best of --repeats."""
    sides = {}
    for side in ("ours", "bare"):
        cmd = [sys.executable, __file__, "--vllm-side", side, "--model-dir", str(model_dir)]
        for key in ("prompts", "samples", "tokens", "repeats", "threads", "dtype", "device"):
            cmd.append(f"--{key.replace('_', '-')}={getattr(args, key)}")
        cmd.append(f"--gpu-memory-utilization={args.gpu_memory_utilization}")
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(
                f"the vLLM {side} process exited with {out.returncode}: {out.stderr[-2000:]}"
            )
        sides[side] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, bare = sides["ours"]["seconds"], sides["bare"]["seconds"]
    tokens = sides["ours"]["tokens"]
    return {
        "ours_tokens_per_s": tokens / ours,
        "bare_tokens_per_s": tokens / bare["logprobs"],
        "bare_no_logprobs_tokens_per_s": tokens / bare["plain"],
        "ratio": bare["logprobs"] / ours,
        "ratio_vs_no_logprobs": bare["plain"] / ours,
        "tokens": tokens,
    }


def vllm_side(model_dir: Path, args) -> dict:
    """One side of the vLLM pair in this process: best seconds over --repeats after a warm-up."""
    n_seq = args.prompts * args.samples
    tokens = n_seq * args.tokens
    common = dict(dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization)
    if args.vllm_side == "ours":
        from scalerl.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine(str(model_dir), max_batch_size=n_seq, **common)
        reqs = [GroupRequest(f"p{i}", p, args.samples) for i, p in enumerate(prompts(args.prompts))]
        settings = SamplingSettings(max_new_tokens=args.tokens, temperature=1.0, ignore_eos=True)

        def ours() -> int:
            return sum(len(c.token_ids) for g in engine.generate(reqs, settings) for c in g)

        assert ours() == tokens  # warm-up, and the work asked for
        return {"seconds": min(timed(ours) for _ in range(args.repeats)), "tokens": tokens}

    from vllm import LLM, SamplingParams

    from scalerl.models import load_tokenizer

    head = {"head_dtype": "float32"} if args.dtype != "float32" else {}
    llm = LLM(
        model=str(model_dir),
        enforce_eager=args.device == "cpu",
        max_num_seqs=n_seq,
        logprobs_mode="processed_logprobs",
        hf_overrides=head,
        async_scheduling=False,
        **common,
    )
    tokenizer = load_tokenizer(str(model_dir))  # the tokenizer VLLMEngine encodes with
    token_prompts = [
        {"prompt_token_ids": tokenizer.encode(p, add_special_tokens=False)}
        for p in prompts(args.prompts)
    ]

    def bare(logprobs: int | None) -> int:
        params = SamplingParams(
            n=args.samples,
            temperature=1.0,
            max_tokens=args.tokens,
            ignore_eos=True,
            logprobs=logprobs,
            detokenize=False,
        )
        outs = llm.generate(token_prompts, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    assert bare(0) == bare(None) == tokens
    t_logprobs, t_plain = [], []
    for _ in range(args.repeats):  # interleaved within this side
        t_logprobs.append(timed(lambda: bare(0)))
        t_plain.append(timed(lambda: bare(None)))
    return {"seconds": {"logprobs": min(t_logprobs), "plain": min(t_plain)}, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    ap.add_argument(
        "--model-shape",
        choices=sorted(SHAPES),
        default="tiny",
        help="tiny (CPU) or qwen2-0.5b (GPU use: a random model with Qwen2-0.5B's shape)",
    )
    ap.add_argument("--dtype", default="float32", help="float32 on CPU; bfloat16 on GPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--vllm-side", choices=["ours", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.vllm_side:  # a child of bench_vllm: one side, one JSON line
        print(json.dumps(vllm_side(Path(args.model_dir), args)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", seed=0, **SHAPES[args.model_shape])
        for name in args.engines.split(","):
            results[name] = {"hf": bench_hf, "vllm": bench_vllm}[name](model_dir, args)
    print(
        json.dumps(
            {
                "benchmark": "engine_throughput",
                "settings": {k: v for k, v in vars(args).items()},
                "results": results,
                "goal": "ratio >= 0.9",
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
