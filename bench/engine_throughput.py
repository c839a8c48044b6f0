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
  bare call without logprobs for reference. Both vLLM engines are in-process.
Runs are interleaved (ours, bare, ours, bare) and the best of --repeats is kept.

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


def bench_hf(model_dir: Path, args) -> dict:
    from scalerl.engines.hf import TransformersEngine

    n_seq = args.prompts * args.samples
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
    from vllm import LLM, SamplingParams

    from scalerl.engines.vllm_engine import VLLMEngine

    n_seq = args.prompts * args.samples
    common = dict(dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization)
    engine = VLLMEngine(str(model_dir), max_batch_size=n_seq, **common)
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
    reqs = [GroupRequest(f"p{i}", p, args.samples) for i, p in enumerate(prompts(args.prompts))]
    settings = SamplingSettings(max_new_tokens=args.tokens, temperature=1.0, ignore_eos=True)
    token_prompts = [
        {"prompt_token_ids": engine.tokenizer.encode(p, add_special_tokens=False)}
        for p in prompts(args.prompts)
    ]

    def ours() -> int:
        return sum(len(c.token_ids) for g in engine.generate(reqs, settings) for c in g)

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

    assert ours() == bare(0) == bare(None) == n_seq * args.tokens
    t_ours, t_bare, t_plain = [], [], []
    for _ in range(args.repeats):
        t_ours.append(timed(ours))
        t_bare.append(timed(lambda: bare(0)))
        t_plain.append(timed(lambda: bare(None)))
    tokens = n_seq * args.tokens
    return {
        "ours_tokens_per_s": tokens / min(t_ours),
        "bare_tokens_per_s": tokens / min(t_bare),
        "bare_no_logprobs_tokens_per_s": tokens / min(t_plain),
        "ratio": min(t_bare) / min(t_ours),
        "ratio_vs_no_logprobs": min(t_plain) / min(t_ours),
        "tokens": tokens,
    }


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
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
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
