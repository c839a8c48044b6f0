"""Multi-GPU training with FSDP2 (torch.distributed.fsdp.fully_shard) under torchrun.

    placement.trainer_ranks = N > 1: the train-policy task runs
    python -m torch.distributed.run --nproc-per-node N -m runtime.trainer_rank SPEC  (runtime/torchrun.py)

The Trainer calls DataParallel.from_env(): with WORLD_SIZE > 1 (torchrun sets it) it joins the
process group (NCCL on CUDA, gloo otherwise), pins cuda:LOCAL_RANK, and from then on:

- Collective timeout: trainer.collective_timeout_s (default 1 h, not torch's 10 min), passed
  to from_env and on to init_process_group: rank 0 alone downloads the checkpoint to resume
  and uploads checkpoints while the other ranks wait in a collective, and at 8B over S3
  (~131 GB of fp32 weights and moments) that can pass 10 minutes.
- Sharding: every decoder layer, then the PolicyLogprobs wrapper as the root, is wrapped with
  fully_shard. Master weights and AdamW state stay float32 and sharded; each layer's
  MixedPrecisionPolicy casts its parameters to model.dtype (bf16) for compute, and every
  gradient is reduced in float32. The root group (embeddings, final norm, LM head) keeps
  float32 parameters when algorithm.fp32_lm_head is on: the FP32 head multiplies the fp32
  master weights, as in one process (a bf16 root would hand it bf16-rounded weights that
  .float() cannot restore). With tied embeddings the head IS the embedding, one parameter in
  one group, so one policy serves both; fp32 embeddings are also what one process computes
  (autocast leaves embedding lookups and the norm in fp32). The head cannot get a group of its
  own: FSDP unshards a group when its module's forward runs, and the head's weight is read
  directly (scalerl/fp32_head.py), never through lm_head.forward. Without the FP32 head (the
  ablation) the root is bf16 like the layers.
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
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DataParallel:
    rank: int
    world_size: int
    device: str

    @classmethod
    def from_env(cls, collective_timeout_s: float | None = None) -> DataParallel | None:
        """Join the torchrun process group if WORLD_SIZE > 1; None for a single process.
        collective_timeout_s: how long a collective may wait (trainer.collective_timeout_s;
        None: that field's default)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        if collective_timeout_s is None:
            from scalerl.config import TrainerConfig

            collective_timeout_s = TrainerConfig.model_fields["collective_timeout_s"].default
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        else:
            device = "cpu"
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if device.startswith("cuda") else "gloo",
                timeout=timedelta(seconds=collective_timeout_s),
            )
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)

    # -- model -----------------------------------------------------------------------------

    def shard(self, policy: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
        """fully_shard each decoder layer (compute_dtype compute), then the wrapper (fp32 with
        the FP32 head: see the module docstring); gradients reduced in float32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in policy.model.base_model.layers:
            fully_shard(layer, mp_policy=mp)
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        fully_shard(policy, mp_policy=fp32 if getattr(policy, "fp32_head", False) else mp)
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

    # -- memory at scale: meta-device build, per-rank weight loading -------------------------

    def empty_model(self, path: str):
        """The model built on the meta device from `path`'s config (no memory for weights on
        any rank; fully_shard then materialize() allocate each rank's shards only) and its
        tokenizer."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from scalerl.models import load_tokenizer

        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return model, load_tokenizer(path)

    def materialize(self, policy: nn.Module) -> None:
        """After fully_shard on the meta model: allocate this rank's shards on its device
        (values are loaded next) and recompute the non-persistent buffers (RoPE frequencies),
        which no checkpoint holds."""
        policy.to_empty(device=self.device)
        init_buffers(policy.model, self.device)

    def load_hf_weights(self, policy: nn.Module, path: str | Path) -> None:
        """Each rank reads only its slices of the safetensors at `path`
        (torch.distributed.checkpoint's HuggingFaceStorageReader), cast to float32."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
        )

        state = get_model_state_dict(policy.model)
        if getattr(policy.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # saved once, as the embedding
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
        set_model_state_dict(policy.model, state, options=StateDictOptions(strict=False))

    # -- sharded checkpoints (torch.distributed.checkpoint) ----------------------------------

    @property
    def local_rank(self) -> int:
        """This rank's index on its node (torchrun's LOCAL_RANK; without it, one node)."""
        return int(os.environ.get("LOCAL_RANK", str(self.rank)))

    @property
    def nodes(self) -> int:
        """Trainer nodes (torchrun agents): WORLD_SIZE / LOCAL_WORLD_SIZE."""
        return self.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))

    def shared_dir(self, prefix: str) -> Path:
        """A temporary directory of this rank's node, made by the node's first rank, whose
        path every rank of that node gets (ranks of one node share its file system; nodes
        share nothing: each node has its own). Ranks are numbered node by node (torchrun)."""
        import tempfile

        made = tempfile.mkdtemp(prefix=prefix) if self.local_rank == 0 else None
        every: list = [None] * self.world_size
        dist.all_gather_object(every, made)
        return Path(every[self.rank - self.local_rank])

    def gather_to_main(self, value) -> list | None:
        """Every rank's `value`, in rank order, on rank 0 (None elsewhere); a collective."""
        out: list | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, out, dst=0)
        return out

    def barrier(self) -> None:
        dist.barrier()

    # -- published weights: gathered one tensor at a time -------------------------------------

    def full_model_state(self, policy: nn.Module, dtype: torch.dtype | None = None) -> dict:
        """The unsharded HF model state on CPU on rank 0 (empty elsewhere), one parameter
        all-gathered at a time and cast to `dtype` (the generators' dtype) on the way, so no
        rank ever holds the whole model in float32. Collective: every rank iterates the same
        keys in the same order."""
        from torch.distributed.tensor import DTensor

        out: dict = {}
        # Tied weights (an LM head that is the embedding) are gathered once and aliased. They
        # are found by parameter object: state_dict() detaches every entry into a new tensor,
        # so its values never share an id(), and a DTensor shard's storage can be empty (any
        # two empty shards would look alike). The modules' structure is the same on every
        # rank, so every rank skips the same keys and the collectives stay in step.
        params = dict(policy.model.named_parameters(remove_duplicate=False))
        seen: dict[int, str] = {}  # id of a parameter -> the first key that holds it
        for name, value in policy.model.state_dict().items():
            param = params.get(name)  # None for a buffer
            if param is not None and id(param) in seen:
                if self.rank == 0:
                    out[name] = out[seen[id(param)]]
                continue
            if param is not None:
                seen[id(param)] = name
            full = value.full_tensor() if isinstance(value, DTensor) else value
            if self.rank == 0:
                full = full.detach()
                out[name] = (full.to(dtype) if dtype and full.is_floating_point() else full).cpu()
            del full
        return out

    def optimizer_loader(self, policy: nn.Module, optimizer: torch.optim.Optimizer):
        """A hook for restore_training_state: load a full optimizer state into the shards (a
        checkpoint written by a single-process trainer, resumed with several ranks)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        def load(full: dict) -> None:
            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(policy, optimizer, optim_state_dict=full, options=opts)

        return load


def init_buffers(model: nn.Module, device) -> None:
    """Recompute every non-persistent buffer of a model materialized from the meta device:
    transformers' rotary embeddings build theirs from the config (type(m)(m.config))."""
    for name, module in model.named_modules():
        missing = getattr(module, "_non_persistent_buffers_set", set())
        if not missing:
            continue
        try:
            fresh = type(module)(module.config)
        except Exception as e:  # noqa: BLE001 - one message naming the module
            raise RuntimeError(
                f"cannot rebuild the buffers {sorted(missing)} of {name or 'the model'} "
                f"({type(module).__name__}) after building it on the meta device: {e}. Fix: "
                "run this architecture with placement.trainer_ranks=1."
            ) from e
        for buf in missing:
            setattr(module, buf, getattr(fresh, buf).to(device))


DCP_DIR = "dcp"  # inside a checkpoint directory: torch.distributed.checkpoint files


def save_sharded_state(policy: nn.Module, optimizer: torch.optim.Optimizer, out: Path) -> None:
    """Model and AdamW state as torch.distributed.checkpoint shards: each rank writes its own
    part (no gather of the full optimizer state anywhere); a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(policy, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out))


def load_sharded_state(policy: nn.Module, optimizer: torch.optim.Optimizer, src: Path) -> None:
    """The inverse of save_sharded_state, at any world size (DCP reshards on load), also in
    a single process without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(src))
    set_state_dict(
        policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
