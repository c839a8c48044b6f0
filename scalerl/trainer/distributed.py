"""Multi-GPU training with FSDP2 (torch.distributed.fsdp.fully_shard) under torchrun.

    placement.trainer_ranks = N > 1: the train-policy task runs
    python -m torch.distributed.run --nproc-per-node N -m tasks.trainer_rank SPEC  (tasks/torchrun.py)

The Trainer calls DataParallel.from_env(): with WORLD_SIZE > 1 (torchrun sets it) it joins the
process group (NCCL on CUDA, gloo otherwise), pins cuda:LOCAL_RANK, and from then on:

- Sharding: every decoder layer, then the PolicyLogprobs wrapper as the root, is wrapped with
  fully_shard. Master weights and AdamW state stay float32 and sharded; MixedPrecisionPolicy
  casts parameters to model.dtype (bf16) for compute and reduces gradients in float32. The
  FP32 head still upcasts hidden states and the (gathered) head weight to float32.
- Data: every rank reads the same shards and builds the same batch (the assembler is
  deterministic): rank 0 lists the ready shards and broadcasts the list (from_main), so ranks
  never see different sets of a store that changes under them; a shard any rank rejects is
  rejected by all, and only rank 0 moves it to quarantine, after every rank has read it. What
  depends on the store or the clock (a stop, the idle timeout, which checkpoint to resume, whether
  v0 is published) is rank 0's decision, broadcast. Then every rank computes the full-batch token weights, then trains only its share of the
  rows (longest first, dealt round-robin for balance). The loss is a weighted SUM whose weights
  already sum to 1 over the whole batch, so gradients must be summed across ranks: each rank
  scales its loss by world_size before backward, which undoes FSDP's mean (this works on every
  backend; set_gradient_divide_factor needs PREMUL_SUM, which gloo lacks).
- Every rank runs the same number of micro-batches (padded with zero-weight dummies): FSDP's
  all-gathers and reduce-scatters are collectives, and a rank that stopped early would hang the
  others.
- Rank 0 publishes weights, writes metrics and checkpoints; full (unsharded) model and optimizer
  states are gathered with torch.distributed.checkpoint.state_dict on every rank (collective)
  and handed to rank 0's writers. A sharded run's optimizer.pt is keyed by parameter names, a
  single-process one by parameter index: resume with the same mode that wrote the checkpoint.

Tests (tests/scalerl/trainer/test_distributed.py): 2 gloo ranks on CPU (marker slow, in CI) and
2 NCCL ranks on GPUs (marker gpu) must match a single process step for step, including a resume
that loads the full optimizer state into the shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DataParallel:
    rank: int
    world_size: int
    device: str

    @classmethod
    def from_env(cls) -> DataParallel | None:
        """Join the torchrun process group if WORLD_SIZE > 1; None for a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        else:
            device = "cpu"
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)

    # -- model -----------------------------------------------------------------------------

    def shard(self, policy: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
        """fully_shard each decoder layer, then the wrapper; bf16 compute, fp32 reductions."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in policy.model.base_model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(policy, mp_policy=mp)
        policy.compute_dtype = None  # FSDP casts the parameters; no autocast on top
        return policy

    # -- data ------------------------------------------------------------------------------

    def rows_for_rank(self, rows: list[int], lengths: list[int]) -> list[int]:
        """This rank's share of `rows`: longest first, dealt round-robin."""
        order = sorted(rows, key=lambda i: (-lengths[i], i))
        return order[self.rank :: self.world_size]

    def pad_plan(self, plan: list[list[int]]) -> list[list[int]]:
        """Append empty micro-batches so that every rank runs the same number."""
        n = torch.tensor([len(plan)], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        return plan + [[] for _ in range(int(n) - len(plan))]

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Combine per-rank loss metrics as merge_metrics does across micro-batches."""
        keys = sorted(metrics)
        weight = metrics.get("tokens", 1.0)
        sums, maxes, mins = [], [], []
        for k in keys:
            v = metrics[k]
            sums.append(v if k in ("loss", "tokens", "samples") else v * weight)
            maxes.append(v)
            mins.append(v)
        t = torch.tensor(sums + [weight], dtype=torch.float64, device=self.device)
        hi = torch.tensor(maxes, dtype=torch.float64, device=self.device)
        lo = torch.tensor(mins, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        total_w = float(t[-1]) or 1.0
        out = {}
        for i, k in enumerate(keys):
            if k in ("loss", "tokens", "samples"):
                out[k] = float(t[i])
            elif k.endswith("_max"):
                out[k] = float(hi[i])
            elif k.endswith("_min"):
                out[k] = float(lo[i])
            else:
                out[k] = float(t[i]) / total_w
        return out

    def from_main(self, value):
        """Rank 0's `value` on every rank (a collective): what only rank 0 may decide, because
        it depends on the store or the clock (which shards are ready, a stop, a checkpoint)."""
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def any_true(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    # -- full states for rank 0's writers -----------------------------------------------------

    def full_model_state(self, policy: nn.Module) -> dict:
        """The unsharded HF model state dict on CPU (rank 0; empty elsewhere). Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(policy.model, options=opts)

    def full_optimizer_state(self, policy: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(policy, optimizer, options=opts)

    def optimizer_loader(self, policy: nn.Module, optimizer: torch.optim.Optimizer):
        """A hook for restore_training_state: load a full optimizer state into the shards."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        def load(full: dict) -> None:
            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(policy, optimizer, optim_state_dict=full, options=opts)

        return load
