"""Benchmark: one CISPO loss step (prompt-level weights + loss + backward) vs a bare masked mean.

Run:  .venv/bin/python bench/loss_step.py [--batch 768] [--seq 2048] [--vocab 32] [--threads 1]

Two settings, timed interleaved (ours, bare, ours, bare, ...) and reported as medians:
- "leaf": logprobs are a (B, T) leaf tensor. This isolates the loss's own cost, so the ratio is a
  worst case: the bare step does almost nothing (one multiply-reduce and its backward).
- "logits": logprobs come from a fixed (B, T, V) logits tensor via log_softmax + gather, as in a
  trainer (with a small V to fit the CPU); both steps include that work and its backward.

ours = token_weights(mask, group_ids, "prompt") + cispo_loss(...) + backward (metrics included)
bare = -(logprobs * mask).sum() / mask.sum() + backward
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from scalerl.losses import cispo_loss, token_weights


def make_batch(b: int, t: int, g: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 8, t + 1, (b,), generator=gen)  # (B,) varied completion lengths
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T) bool
    logprobs = -torch.rand(b, t, generator=gen) * 3  # (B, T)
    old = logprobs + 0.3 * torch.randn(b, t, generator=gen)
    rewards = torch.randint(0, 2, (b,), generator=gen).float()
    return {
        "logprobs": logprobs,
        "old": old,
        "mask": mask,
        "group_ids": torch.arange(b) // g,
        "advantages": rewards - rewards.mean(),
    }


def step_ours(lp: torch.Tensor, d: dict[str, torch.Tensor]) -> None:
    w = token_weights(d["mask"], d["group_ids"], "prompt")
    loss, _ = cispo_loss(
        lp, d["old"], d["advantages"], d["mask"], d["group_ids"], weights=w, eps_max=4.0
    )
    loss.backward()


def step_bare(lp: torch.Tensor, d: dict[str, torch.Tensor]) -> None:
    m = d["mask"]
    loss = -(lp * m).sum() / m.sum()
    loss.backward()


def time_pair(make_leaf, produce, d, repeats: int) -> dict[str, float]:
    """Median wall and thread-CPU seconds of each step, alternating which runs first.

    make_leaf() builds the input with requires_grad (untimed); produce(leaf) -> logprobs is timed.
    """
    steps = {"ours": step_ours, "bare": step_bare}
    wall: dict[str, list[float]] = {"ours": [], "bare": []}
    cpu: dict[str, list[float]] = {"ours": [], "bare": []}
    for r in range(repeats + 2):  # two warm-up rounds, not recorded
        for name in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):
            leaf = make_leaf()
            c0, t0 = time.thread_time(), time.perf_counter()
            steps[name](produce(leaf), d)
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            leaf.grad = None
            if r >= 2:
                wall[name].append(dt)
                cpu[name].append(dc)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "ours_s": med["ours"],
        "bare_s": med["bare"],
        "ratio": med["ours"] / med["bare"],
        "ours_cpu_s": med_cpu["ours"],
        "bare_cpu_s": med_cpu["bare"],
        "ratio_cpu": med_cpu["ours"] / med_cpu["bare"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=768, help="completions (B)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per completion (T)")
    p.add_argument("--group", type=int, default=16, help="completions per prompt (G)")
    p.add_argument("--vocab", type=int, default=32, help="V of the logits setting")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 by default because on a small shared machine a second "
        "thread that gets preempted makes every op wait (timings then swing by 10x)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = make_batch(args.batch, args.seq, args.group)

    def leaf_logprobs():
        return d["logprobs"].clone().requires_grad_(True)  # (B, T)

    logits_base = torch.randn(args.batch, args.seq, args.vocab)  # (B, T, V)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq, 1))  # (B, T, 1)

    def logits_leaf():
        return logits_base.clone().requires_grad_(True)

    def logits_to_logprobs(logits):
        return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)  # (B, T)

    leaf = time_pair(leaf_logprobs, lambda x: x, d, args.repeats)
    from_logits = time_pair(logits_leaf, logits_to_logprobs, d, args.repeats)
    with torch.no_grad():
        _, m = cispo_loss(
            d["logprobs"], d["old"], d["advantages"], d["mask"], d["group_ids"], eps_max=4.0
        )
    print(
        json.dumps(
            {
                "bench": "cispo_loss_step",
                "what": "prompt-level token_weights + cispo_loss (metrics included) + backward, "
                "vs bare -(logprobs*mask).sum()/mask.sum() + backward; medians, interleaved",
                "batch": args.batch,
                "seq": args.seq,
                "group": args.group,
                "tokens_in_mask": int(d["mask"].sum()),
                "truncated_fraction": m["truncated_fraction"],
                "goal": "ours within 1.2x of bare",
                "repeats": args.repeats,
                "leaf": leaf,
                "logits": {"vocab": args.vocab, **from_logits},
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "device": "cpu",
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
