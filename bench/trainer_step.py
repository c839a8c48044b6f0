"""Trainer step throughput vs a bare forward/backward/AdamW loop on the same batches and model.

    .venv/bin/python bench/trainer_step.py                       # small Qwen2 on CPU
    python bench/trainer_step.py --model-shape qwen2-0.5b --device cuda --dtype bfloat16

"Ours" is scalerl.trainer.step.train_step: rollout table -> advantages (batch-normalized,
zero-variance filter) -> full-batch prompt-level token weights -> token-budget micro-batches ->
FP32-head CISPO loss -> backward -> clip -> AdamW. "Bare" is the loop a hand-written trainer
would run on the SAME padded micro-batches: model(...).logits -> log_softmax -> gather ->
advantage-weighted token mean -> backward -> clip -> AdamW (no table handling, no weights, no
ratio). Both use the same random-init model (copied), batch and micro-batch budget. Training
tokens/s counts completion tokens. Prints one JSON object; the goal is ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time

import pyarrow as pa
import torch

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


def bare_step(model, opt, batches: list[dict], advantages: torch.Tensor, n_tokens: int) -> None:
    opt.zero_grad(set_to_none=True)
    for x, rows in batches:
        logits = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        logp = torch.log_softmax(logits.float(), -1)  # (b, L, V)
        lp = logp.gather(1, x["positions"].unsqueeze(-1).expand(-1, -1, logp.shape[-1]))
        lp = lp.gather(-1, x["targets"].unsqueeze(-1)).squeeze(-1)  # (b, Tc)
        mask = (x["old_logprobs"] != 0).float()
        loss = -(lp * mask * advantages[rows, None]).sum() / n_tokens
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


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
    lengths = [r.seq_len(i) for i in range(len(r.rewards))]
    plan = plan_micro_batches(lengths, list(range(len(lengths))), args.micro_batch_tokens)
    batches = [(collate(r, mb, 0, device), torch.tensor(mb)) for mb in plan]
    adv = (r.rewards - r.rewards.mean()).to(device)
    ctx = (
        torch.autocast(device.type, dtype=compute)
        if compute
        else torch.autocast(device.type, enabled=False)
    )

    def bare() -> None:
        with ctx:
            bare_step(model, bare_opt, batches, adv, n_tokens)

    def once(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    bare(), ours()  # warm-up
    # Interleaved, so that load from other processes hits both sides alike; medians.
    times_bare, times_ours = [], []
    for _ in range(args.steps):
        times_bare.append(once(bare))
        times_ours.append(once(ours))
    t_bare, t_ours = statistics.median(times_bare), statistics.median(times_ours)
    print(
        json.dumps(
            {
                "bench": "trainer_step",
                "model_shape": args.model_shape,
                "params_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 2),
                "device": str(device),
                "dtype": args.dtype,
                "completions": len(lengths),
                "completion_tokens": n_tokens,
                "micro_batches": len(plan),
                "ours_tokens_per_s": round(n_tokens / t_ours, 1),
                "bare_tokens_per_s": round(n_tokens / t_bare, 1),
                "ratio": round(t_bare / t_ours, 3),
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
