"""Trainer checkpoints: everything needed to continue a run bit-identically, in one local dir.

    write_checkpoint(tmp, model=..., tokenizer=..., optimizer=..., scheduler=..., state=state)
    store.save(state.step, tmp)                   # the store commits it atomically
    ...
    local = store.load(store.latest_step(), tmp)  # after a crash
    model, tok = load_policy(str(model_dir(local)))   # weights first (optimizer needs params)
    state = restore_training_state(local, optimizer=opt, scheduler=sched)  # + RNG states

Layout of a checkpoint directory:

    model/               save_pretrained: safetensors + config.json + tokenizer (exact float32);
                         under model.lora only model/adapter/ (scalerl/lora.py) + tokenizer:
                         the adapter in float32, the base being the run's version 0
    optimizer.pt         AdamW state_dict (moments, step counts)
    dcp/                 instead of model/'s weights and optimizer.pt when the trainer ran as
                         several ranks: torch.distributed.checkpoint shards of model and AdamW
                         state, one file per rank plus .metadata; loadable at any world size
    scheduler.pt         LR scheduler state_dict
    rng.pt / rng.json    torch (CPU + every CUDA device) / python + numpy generator states
    trainer_state.json   step, skipped-NaN count, curriculum version, compute counters and the
                         batch assembler's buffer (shards read, pending groups, consumed groups)
    ledger.jsonl         one line per optimizer step: the shards and groups it consumed

The trainer writes the directory locally and hands it to a CheckpointStore, whose commit rule
(storage: files first, manifest last) means a crash mid-write leaves the previous checkpoint the
latest usable one. torch.load runs with weights_only=True: a checkpoint cannot execute code.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

MODEL_DIR = "model"
FORMAT = "scalerl.trainer-checkpoint/1"


class CheckpointStore(Protocol):
    """Durable checkpoints by step (runtime/trainer_io.py implements it over a run store)."""

    def latest_step(self) -> int | None:
        """The newest fully committed checkpoint step, None if there is none."""
        ...

    def save(self, step: int, local_dir: Path) -> None:
        """Commit the directory as checkpoint `step` (atomically; replaces a same-step one)."""
        ...

    # optional, for trainers over several nodes that share no file system (the trainer's
    # checkpoint() calls them when its ranks span nodes):
    #   withdraw(step): take a committed same-step checkpoint out of use before it is rewritten
    #   upload_part(step, local_dir) -> entries: this node's files, uploaded; no commit
    #   save(step, local_dir, extra=entries): commit, listing the parts uploaded elsewhere

    def load(self, step: int, local_dir: Path) -> Path | None:
        """Download checkpoint `step` into local_dir; return the directory holding its files.
        A store that finds `step` damaged may quarantine it and return an older intact
        checkpoint instead (its trainer_state.json names its step), or None when none is left
        (the trainer then starts as without a checkpoint)."""
        ...


@dataclass(frozen=True)
class TrainerState:
    """The trainer's own state beyond model, optimizer, scheduler and RNG."""

    step: int
    nan_steps: int = 0
    curriculum_version: int | None = None
    counters: dict[str, float] = field(default_factory=dict)
    assembler: dict = field(default_factory=dict)
    ledger: tuple[dict, ...] = ()


def model_dir(checkpoint_dir: str | Path) -> Path:
    """The save_pretrained directory inside a checkpoint (load it with load_policy)."""
    return Path(checkpoint_dir) / MODEL_DIR


def rng_state() -> tuple[dict, dict]:
    """(tensor states for torch.save, plain-data states for JSON) of every generator we use."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    np_state = np.random.get_state()
    plain = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
    }
    return tensors, plain


def _plain(x):
    return x.item() if hasattr(x, "item") else x


def set_rng_state(tensors: dict, plain: dict) -> None:
    """Restore what rng_state() captured: CPU, Python and numpy always; of the CUDA states,
    one per device that was visible when it was saved, only those of devices present now."""
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        # A checkpoint from 4 ranks or a 2-GPU box holds more states than a smaller machine has
        # devices, and set_rng_state_all would index past them. States past the devices present
        # belonged to devices no process here uses: their streams end (the run is resumable at
        # another number of ranks, not bit-identical to one that kept them). Devices beyond the
        # saved ones keep the state they were seeded with.
        saved = list(tensors["cuda"])
        torch.cuda.set_rng_state_all(saved[: min(len(saved), torch.cuda.device_count())])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_checkpoint(
    local_dir: str | Path,
    *,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainerState,
    model_state_dict: dict | None = None,
    optimizer_state_dict: dict | None = None,
    sharded: bool = False,
    lora=None,
) -> Path:
    """Write a complete checkpoint into local_dir (created). The *_state_dict arguments let a
    caller pass full states; by default they are taken from the objects. sharded: the ranks
    have already written model and optimizer as torch.distributed.checkpoint shards into
    local_dir/dcp (scalerl/trainer/distributed.py), so model/ gets only config and tokenizer
    and there is no optimizer.pt."""
    out = Path(local_dir)
    out.mkdir(parents=True, exist_ok=True)
    if lora is not None:  # model.lora: the adapter in float32, exact; the base is version 0
        from scalerl.lora import ADAPTER_DIR, adapter_state, save_adapter

        save_adapter(out / MODEL_DIR / ADAPTER_DIR, adapter_state(model), lora)
    elif sharded:
        model.config.save_pretrained(out / MODEL_DIR)
    else:
        model.save_pretrained(out / MODEL_DIR, state_dict=model_state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out / MODEL_DIR)
    if not sharded:
        torch.save(optimizer_state_dict or optimizer.state_dict(), out / "optimizer.pt")
    torch.save(scheduler.state_dict(), out / "scheduler.pt")
    tensors, plain = rng_state()
    torch.save(tensors, out / "rng.pt")
    (out / "rng.json").write_text(json.dumps(plain))
    meta = asdict(state)
    ledger = meta.pop("ledger")
    (out / "trainer_state.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1))
    (out / "ledger.jsonl").write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in ledger))
    return out


def read_trainer_state(local_dir: str | Path) -> TrainerState:
    """The TrainerState of a checkpoint directory (no side effects)."""
    d = Path(local_dir)
    path = d / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{d} is not a trainer checkpoint (no trainer_state.json). Fix: pass a directory "
            "written by write_checkpoint (or the store's load of one)."
        )
    meta = json.loads(path.read_text())
    if meta.pop("format", None) != FORMAT:
        raise ValueError(
            f"{path} is not a {FORMAT} checkpoint. Fix: resume with the scalerl release that "
            "wrote it, or start the run from its weights instead."
        )
    lines = (d / "ledger.jsonl").read_text().splitlines()
    return TrainerState(**meta, ledger=tuple(json.loads(x) for x in lines if x))


def restore_training_state(
    local_dir: str | Path,
    *,
    optimizer: torch.optim.Optimizer | None,
    scheduler,
    optimizer_state_dict_hook=None,
) -> TrainerState:
    """Load optimizer, scheduler and RNG states from a checkpoint; return its TrainerState.

    The model weights come from model_dir(local_dir) through load_policy, before the optimizer
    is built. optimizer_state_dict_hook(full_state_dict) lets a sharded trainer load a full
    optimizer state into its shards instead of optimizer.load_state_dict.
    """
    d = Path(local_dir)
    state = read_trainer_state(d)
    if optimizer is not None:  # None: loaded from the sharded dcp/ files already
        optim_sd = torch.load(d / "optimizer.pt", weights_only=True, map_location="cpu")
        if optimizer_state_dict_hook is not None:
            optimizer_state_dict_hook(optim_sd)
        else:
            optimizer.load_state_dict(optim_sd)
    scheduler.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
    set_rng_state(
        torch.load(d / "rng.pt", weights_only=True), json.loads((d / "rng.json").read_text())
    )
    return state
