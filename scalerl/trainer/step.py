"""One optimizer step: batch-normalized advantages, the configured loss over token-budget
micro-batches with exact gradient accumulation, FP32 LM head, clipping, AdamW.

    spec = StepSpec.from_config(cfg)
    policy = PolicyLogprobs(model, fp32_head=True, compute_dtype=torch.bfloat16)
    out = train_step(policy, optimizer, scheduler, batch.table, spec, pad_token_id=tok.pad_token_id)

The objective (../shared/SCALERL.md sec. 3), minimized:

    loss = - sum_{i,t} w_it * sg(min(rho_it, eps_max)) * A_i^norm * log pi_theta(y_it)     (CISPO)

- A^norm: group-centered rewards / batch std over kept samples (scalerl/advantages.py); groups
  whose rewards are all equal are dropped (zero-variance filtering) and never run through the
  model.
- w = token_weights(mask, group_ids, aggregation, keep) over the WHOLE batch (prompt-level by
  default): each micro-batch gets its rows' slice of w, so the sum of micro-batch losses and
  gradients equals the full-batch ones exactly, whatever the token budget.
- mask: completion tokens the policy sampled. Tokens injected by length control (the
  interruption phrase; rollout column `sampled` = False, logprob 0) stay in the input as
  context but are masked out of the loss and of rho.
- log pi_theta: body in `compute_dtype` (autocast; master weights and AdamW state stay
  float32, since bf16 weights would swallow lr 5e-7 updates), LM head + log-softmax in float32
  (paper sec. 3.3) unless fp32_lm_head is off.
- Rows the filter stage marked unusable (filter_reason "no_tokens" / "nonfinite_logprobs") are
  left out of advantages and loss but still count toward their group's G (they were offered).
- A non-finite loss or gradient norm skips the step (no weight change) and reports skipped=True.

Micro-batches: rows sorted by sequence length (longest first), packed greedily so that
rows x longest row <= micro_batch_tokens (padded tokens, what memory sees); a row longer than
the budget runs alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor, nn

from scalerl.advantages import compute_advantages
from scalerl.config import RunConfig
from scalerl.fp32_head import final_hidden, logprobs_from_hidden
from scalerl.losses import compute_loss
from scalerl.losses.aggregation import token_weights

# filter_reason values (scalerl/filtering.py) of rows that must never reach the loss; zero
# variance is recomputed here over the usable rows, so "zero_variance" needs no special case.
UNUSABLE = frozenset({"no_tokens", "nonfinite_logprobs"})


@dataclass(frozen=True)
class StepSpec:
    """What one step needs from the RunConfig (algorithm, optimizer, trainer sections)."""

    loss: str = "cispo"
    loss_params: tuple[tuple[str, float], ...] = (("eps_max", 4.0),)
    aggregation: str = "prompt"
    normalization: str = "batch"
    zero_variance_filter: bool = True
    micro_batch_tokens: int = 32_768
    max_grad_norm: float = 1.0

    @classmethod
    def from_config(cls, cfg: RunConfig) -> StepSpec:
        loss = cfg.algorithm.loss.model_dump()
        name = loss.pop("type")
        return cls(
            loss=name,
            loss_params=tuple(sorted(loss.items())),
            aggregation=cfg.algorithm.aggregation,
            normalization=cfg.algorithm.advantage_normalization,
            zero_variance_filter=cfg.algorithm.zero_variance_filter,
            micro_batch_tokens=cfg.trainer.micro_batch_tokens,
            max_grad_norm=cfg.optimizer.max_grad_norm,
        )


@dataclass(frozen=True)
class StepOutput:
    """What a step did. `skipped`: non-finite loss/grad, weights unchanged. `empty`: nothing
    survived zero-variance filtering, no forward pass and no optimizer step."""

    skipped: bool
    empty: bool
    metrics: dict[str, float]


class PolicyLogprobs(nn.Module):
    """log pi(completion tokens) (B, Tc) from a causal LM, body in compute_dtype, FP32 head.

    A module (not a function) so FSDP2 can make it the root: its forward unshards the
    embeddings, final norm and LM head for the whole computation.
    """

    def __init__(
        self, model: nn.Module, *, fp32_head: bool = True, compute_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.fp32_head = fp32_head
        self.compute_dtype = None if compute_dtype == torch.float32 else compute_dtype

    def _autocast(self, device: torch.device):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, targets: Tensor
    ) -> Tensor:
        with self._autocast(input_ids.device):
            hidden = final_hidden(self.model, input_ids, attention_mask)  # (B, L, H)
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        h = hidden.gather(1, index)  # (B, Tc, H): the states that predict each completion token
        # Outside autocast: autocast would run the head's matmul in bf16 despite .float().
        head = contextlib.nullcontext() if self.fp32_head else self._autocast(input_ids.device)
        with head:
            return logprobs_from_hidden(self.model, h, targets, fp32_head=self.fp32_head)


@dataclass(frozen=True)
class Rollouts:
    """The batch as ragged numpy rows (one per completion) plus (N,) rewards and groups."""

    prompt_ids: list[np.ndarray]
    completion_ids: list[np.ndarray]
    old_logprobs: list[np.ndarray]
    sampled: list[np.ndarray]  # bool per completion token; False = injected by length control
    rewards: Tensor  # (N,) float32
    group_ids: Tensor  # (N,) int64, dense
    usable: Tensor  # (N,) bool; False where the filter stage marked the row unusable

    @classmethod
    def from_table(cls, table: pa.Table) -> Rollouts:
        completion = _ragged(table.column("completion_token_ids"))
        if "sampled" in table.column_names:
            sampled = [s.astype(bool) for s in _ragged(table.column("sampled"))]
        else:
            sampled = [np.ones(len(c), dtype=bool) for c in completion]
        _, dense = np.unique(np.asarray(table.column("group_id").to_pylist()), return_inverse=True)
        usable = np.ones(table.num_rows, dtype=bool)
        if "filter_reason" in table.column_names:
            reasons = table.column("filter_reason").to_pylist()
            usable = np.array([x not in UNUSABLE for x in reasons], dtype=bool)
        return cls(
            prompt_ids=_ragged(table.column("prompt_token_ids")),
            completion_ids=completion,
            old_logprobs=_ragged(table.column("logprobs")),
            sampled=sampled,
            rewards=torch.tensor(table.column("reward").to_numpy(zero_copy_only=False)),
            group_ids=torch.from_numpy(dense.astype(np.int64)),
            usable=torch.from_numpy(usable),
        )

    def seq_len(self, i: int) -> int:
        return len(self.prompt_ids[i]) + len(self.completion_ids[i])

    def loss_mask(self) -> Tensor:
        """(N, Tc) bool: sampled completion tokens that have a predicting position."""
        n, tc = len(self.completion_ids), max((len(c) for c in self.completion_ids), default=0)
        mask = torch.zeros(n, tc, dtype=torch.bool)
        for i, s in enumerate(self.sampled):
            mask[i, : len(s)] = torch.from_numpy(s)
            if len(self.prompt_ids[i]) == 0 and len(s):
                mask[i, 0] = False  # the first token of a prompt-less row has no context
        return mask


def _ragged(col: pa.ChunkedArray) -> list[np.ndarray]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy()
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


def plan_micro_batches(lengths: list[int], rows: list[int], budget: int) -> list[list[int]]:
    """Group `rows` so that len(group) x longest length in it <= budget (a lone row may exceed)."""
    order = sorted(rows, key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    for i in order:
        if plan and (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= budget:
            plan[-1].append(i)
        else:
            plan.append([i])
    return plan


def collate(r: Rollouts, rows: list[int], pad_token_id: int, device: torch.device) -> dict:
    """Right-padded model inputs and completion-aligned targets for `rows`."""
    b = len(rows)
    length = max(r.seq_len(i) for i in rows)
    tc = max(max(len(r.completion_ids[i]) for i in rows), 1)
    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    attention = torch.zeros(b, length, dtype=torch.long)
    positions = torch.zeros(b, tc, dtype=torch.long)
    targets = torch.zeros(b, tc, dtype=torch.long)
    old = torch.zeros(b, tc, dtype=torch.float32)
    for j, i in enumerate(rows):
        p, c = r.prompt_ids[i], r.completion_ids[i]
        seq = torch.from_numpy(np.concatenate([p, c]).astype(np.int64))
        input_ids[j, : len(seq)] = seq
        attention[j, : len(seq)] = 1
        positions[j, : len(c)] = (torch.arange(len(c)) + len(p) - 1).clamp(min=0)
        targets[j, : len(c)] = torch.from_numpy(c.astype(np.int64))
        old[j, : len(c)] = torch.from_numpy(r.old_logprobs[i].astype(np.float32))
    tensors = dict(
        input_ids=input_ids, attention_mask=attention, positions=positions, targets=targets
    )
    return {k: v.to(device) for k, v in tensors.items()} | {"old_logprobs": old.to(device)}


def merge_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine per-micro-batch loss metrics: sums for loss/tokens/samples, max/min for *_max /
    *_min, and a tokens- (or samples-) weighted mean for the rest."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        vals = [p[key] for p in parts if key in p]
        if key in ("loss", "tokens", "samples"):
            out[key] = float(sum(vals))
        elif key.endswith("_max"):
            out[key] = float(max(vals))
        elif key.endswith("_min"):
            out[key] = float(min(vals))
        else:
            by = "samples" if all("samples" in p for p in parts) else "tokens"
            w = [p.get(by, 1.0) for p in parts if key in p]
            out[key] = float(sum(a * b for a, b in zip(vals, w, strict=True)) / max(sum(w), 1.0))
    return out


def train_step(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    table: pa.Table,
    spec: StepSpec,
    *,
    pad_token_id: int,
    data_parallel=None,
) -> StepOutput:
    """One optimizer step on the batch `table` (see the module docstring).

    data_parallel: None on one process, or a scalerl.trainer.distributed.DataParallel that
    splits the rows across ranks and reduces the metrics.
    """
    t0 = time.perf_counter()
    device = next(policy.parameters()).device
    r = Rollouts.from_table(table)
    u = r.usable
    adv = compute_advantages(
        r.rewards[u],
        r.group_ids[u],
        normalization=spec.normalization,
        filter_zero_variance=spec.zero_variance_filter,
    )
    advantages = torch.zeros(len(u)).masked_scatter_(u, adv.advantages)  # (N,)
    keep = torch.zeros(len(u), dtype=torch.bool).masked_scatter_(u, adv.keep)  # (N,)
    mask = r.loss_mask()  # (N, Tc)
    weights = token_weights(mask, r.group_ids, spec.aggregation, keep=keep)  # (N, Tc)
    rows = [i for i in range(len(r.rewards)) if weights[i].sum() > 0]
    counts = {
        "samples_kept": float(adv.samples_kept),
        "samples_filtered_zero_variance": float(int(u.sum()) - adv.samples_kept),
        "samples_unusable": float(len(u) - int(u.sum())),
        "groups_zero_variance": float(adv.groups_zero_variance),
        "advantage_std": adv.std,
    }
    if not rows:
        return StepOutput(skipped=False, empty=True, metrics=counts)

    trained = rows
    lengths = [r.seq_len(i) for i in range(len(r.rewards))]
    if data_parallel is not None:
        rows = data_parallel.rows_for_rank(rows, lengths)
    plan = plan_micro_batches(lengths, rows, spec.micro_batch_tokens)
    if data_parallel is not None:
        plan = data_parallel.pad_plan(plan)  # equal micro-batch counts on every rank
    params = dict(spec.loss_params)
    optimizer.zero_grad(set_to_none=True)
    parts, finite, seq_tokens = [], True, 0
    for mb in plan:
        x = collate(r, mb or trained[:1], pad_token_id, device)  # [] = dummy row
        tc = x["targets"].shape[1]
        w = weights[mb][:, :tc] if mb else torch.zeros(1, tc)  # empty: a zero-weight dummy row
        m = mask[mb][:, :tc] if mb else torch.zeros(1, tc, dtype=torch.bool)
        logprobs = policy(x["input_ids"], x["attention_mask"], x["positions"], x["targets"])
        loss, metrics = compute_loss(
            spec.loss,
            logprobs=logprobs,
            old_logprobs=x["old_logprobs"],
            advantages=advantages[mb].to(device) if mb else torch.zeros(1, device=device),
            mask=m.to(device),
            group_ids=r.group_ids[mb].to(device)
            if mb
            else torch.zeros(1, dtype=torch.long, device=device),
            aggregation=spec.aggregation,
            weights=w.to(device),
            **params,
        )
        if not math.isfinite(metrics["loss"]):
            finite = False
            if data_parallel is None:
                break  # the step is lost anyway; ranks must keep running the same collectives
        # FSDP averages gradients over ranks; the loss is already a global weighted sum.
        (loss * (data_parallel.world_size if data_parallel is not None else 1)).backward()
        parts.append(metrics)
        seq_tokens += int(x["attention_mask"].sum()) if mb else 0
    metrics = merge_metrics(parts)
    if data_parallel is not None:
        metrics = data_parallel.reduce_metrics(metrics)
        finite = data_parallel.all_true(finite)
    norm = nn.utils.clip_grad_norm_(policy.parameters(), spec.max_grad_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor
    skipped = not (finite and math.isfinite(grad_norm))
    lr = float(optimizer.param_groups[0]["lr"])
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    tokens = float(mask[trained].sum())
    return StepOutput(
        skipped=skipped,
        empty=False,
        metrics={
            **{f"loss/{k}": v for k, v in metrics.items()},
            **counts,
            "loss": metrics.get("loss", float("nan")),
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": tokens,
            "seq_tokens": float(seq_tokens),
            "micro_batches": float(len(plan)),
            "step_time_s": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        },
    )
