"""Trainer step throughput vs a bare forward/backward/AdamW loop on the same batches and model.

    .venv/bin/python bench/trainer_step.py                       # small Qwen2 on CPU
    python bench/trainer_step.py --model-shape qwen2-0.5b --device cuda --dtype bfloat16

"Ours" is scalerl.trainer.step.train_step: rollout table -> advantages (batch-normalized,
zero-variance filter) -> full-batch prompt-level token weights -> token-budget micro-batches ->
FP32-head CISPO loss -> backward -> clip -> AdamW. "Bare" is the loop a hand-written trainer
would run on the SAME padded micro-batches: body -> hidden states at the completion positions
-> the FP32 head chunked as the product chunks it (scalerl/fp32_head.py: full logits at 16k
tokens x 151,936 vocabulary would not fit beside the model on 80 GB) -> advantage-weighted
token mean -> backward -> clip -> AdamW (no table handling, no weights, no ratio). Both use the
same random-init model (copied), batch and micro-batch budget. Training tokens/s counts
completion tokens. fp32_head_share: the head's forward + backward alone over the step's
micro-batches, as a share of our step time. Prints one JSON object; the goal is ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import statistics
import time

import pyarrow as pa
import torch

from scalerl.fp32_head import logprobs_from_hidden
from scalerl.trainer.step import (
    PolicyLogprobs,
    Rollouts,
    StepSpec,
    collate,
    plan_micro_batches,
    train_step,
)

SHAPES = {
    # builtin:tiny / tiny-warm (scalerl/models.py): the tiny-cpu preset's model
    "tiny": dict(
        vocab_size=260, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    ),
    # Small enough for 2 CPU cores, big enough that the model (not Python) dominates.
    "small": dict(
        vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
    ),
    "qwen2-0.5b": dict(
        vocab_size=151_936, hidden_size=896, intermediate_size=4_864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2,
    ),
}  # fmt: skip


def build_model(shape: str, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device).train()


def build_batch(P: int, G: int, prompt_len: int, completion_len: int, vocab: int) -> pa.Table:
    rng = random.Random(0)
    rows = []
    for p in range(P):
        prompt = [rng.randrange(1, vocab) for _ in range(prompt_len)]
        for i in range(G):
            n = rng.randint(completion_len // 2, completion_len)
            rows.append(
                {
                    "group_id": f"g{p}",
                    "prompt_token_ids": prompt,
                    "completion_token_ids": [rng.randrange(1, vocab) for _ in range(n)],
                    "logprobs": [-6.0] * n,
                    "reward": float((i + p) % 2),
                }
            )
    return pa.Table.from_pylist(rows)


def bare_step(model, opt, batches: list, advantages: torch.Tensor, n_tokens: int, compute) -> None:
    """One step of the loop a hand-written trainer would run, with the head chunked as the
    product chunks it: full (rows, length, 151,936) fp32 logits, their log-softmax and the
    gather would be ~10 GB each at 16k tokens (OOM on 80 GB beside the model and AdamW)."""
    opt.zero_grad(set_to_none=True)
    for x, rows in batches:
        with autocast(x["input_ids"].device, compute):
            hidden = model.base_model(
                input_ids=x["input_ids"], attention_mask=x["attention_mask"], use_cache=False
            ).last_hidden_state
        index = x["positions"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        lp = logprobs_from_hidden(model, hidden.gather(1, index), x["targets"])  # (b, Tc) fp32
        mask = (x["old_logprobs"] != 0).float()
        loss = -(lp * mask * advantages[rows, None]).sum() / n_tokens
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def autocast(device: torch.device, compute):
    """bf16 autocast for the body, or nothing for float32."""
    if compute is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute)


def bare_batches(table: pa.Table, micro_batch_tokens: int, device: torch.device) -> list:
    """The micro-batches train_step makes of `table` (same rows, same padding), collated."""
    r = Rollouts.from_table(table)
    lengths = [r.seq_len(i) for i in range(len(r.rewards))]
    plan = plan_micro_batches(lengths, list(range(len(lengths))), micro_batch_tokens)
    return [(collate(r, mb, 0, device), torch.tensor(mb)) for mb in plan]


def seconds(fn, device: torch.device) -> float:
    """Wall time of fn(), the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def head_seconds(model, batches: list, device: torch.device) -> float:
    """Forward + backward of the FP32 head alone (chunked, recomputed in backward) on every
    micro-batch's completion positions: the head's part of one step. Hidden states are random
    (the body is not run); the head weight's gradient is computed as in training, then cleared."""
    hidden_size = model.get_output_embeddings().weight.shape[1]

    def run() -> None:
        for x, _ in batches:
            b, tc = x["targets"].shape
            h = torch.randn(b, tc, hidden_size, device=device)  # autocast leaves the stream fp32
            logprobs_from_hidden(model, h.requires_grad_(), x["targets"]).sum().backward()
        model.zero_grad(set_to_none=True)

    run()  # warm-up
    return seconds(run, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=192)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    device = torch.device(args.device)
    compute = None if args.dtype == "float32" else torch.bfloat16
    base = build_model(args.model_shape, args.device)
    vocab = base.config.vocab_size
    table = build_batch(args.prompts, args.samples, args.prompt_len, args.completion_len, vocab)
    spec = StepSpec(micro_batch_tokens=args.micro_batch_tokens)
    r = Rollouts.from_table(table)
    n_tokens = int(r.loss_mask().sum())

    # Ours.
    policy = PolicyLogprobs(copy.deepcopy(base), fp32_head=True, compute_dtype=compute)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, eps=1e-15, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def ours() -> None:
        train_step(policy, opt, sched, table, spec, pad_token_id=0)

    # Bare, on the same micro-batches (same rows, same padding).
    model = copy.deepcopy(base)
    bare_opt = torch.optim.AdamW(model.parameters(), lr=1e-6, eps=1e-15, weight_decay=0.01)
    batches = bare_batches(table, args.micro_batch_tokens, device)
    adv = (r.rewards - r.rewards.mean()).to(device)

    def bare() -> None:
        bare_step(model, bare_opt, batches, adv, n_tokens, compute)

    bare(), ours()  # warm-up
    # Interleaved, so that load from other processes hits both sides alike; medians.
    times_bare, times_ours = [], []
    for _ in range(args.steps):
        times_bare.append(seconds(bare, device))
        times_ours.append(seconds(ours, device))
    t_bare, t_ours = statistics.median(times_bare), statistics.median(times_ours)
    t_head = head_seconds(model, batches, device)
    print(
        json.dumps(
            {
                "bench": "trainer_step",
                "model_shape": args.model_shape,
                "params_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 2),
                "device": str(device),
                "dtype": args.dtype,
                "completions": len(r.rewards),
                "completion_tokens": n_tokens,
                "micro_batches": len(batches),
                "ours_tokens_per_s": round(n_tokens / t_ours, 1),
                "bare_tokens_per_s": round(n_tokens / t_bare, 1),
                "ratio": round(t_bare / t_ours, 3),
                # both sides run the same chunked FP32 head; its share of our step:
                "fp32_head_s": round(t_head, 4),
                "fp32_head_share": round(t_head / t_ours, 3),
                "steps_timed": args.steps,
                "goal": ">= 0.9",
                "machine": {
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
