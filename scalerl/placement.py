"""Where every process of a run goes: trainer ranks, generator engines, the evaluation engine.

    scalerl plan my_run.yaml            # each process, its devices, its memory by arithmetic
    plan = make_plan(cfg, model_shape(cfg.model.name_or_path))

One topology for GPU and CPU nodes (config section `placement`):

- Devices are numbered across the run, node n's local device d being n x devices_per_node + d.
  The trainer takes placement.trainer_devices (default: the first trainer_ranks devices), the
  evaluation engine placement.evaluation_devices when given, and the generators the devices
  after those, tensor_parallel per engine, never split across machines.
- Each generator and evaluation process starts with its own CUDA_VISIBLE_DEVICES; trainer ranks
  run under torchrun (runtime/torchrun.py) with CUDA_VISIBLE_DEVICES = the trainer's devices of
  that node, so LOCAL_RANK r is its r-th device. On accelerator cpu the same processes start
  without devices and the trainer ranks talk over gloo: CI runs the launcher GPUs use.
- A node's local indices are positions in the devices the run was given there: when the
  process starting the children already has a CUDA_VISIBLE_DEVICES (SLURM, Kubernetes,
  `CUDA_VISIBLE_DEVICES=4,5 scalerl run`), local index i is that list's i-th entry
  (make_plan's `visible`); without one, the machine's device i. check_inventory compares what
  this machine shows with placement.devices_per_node before a run writes anything.
- check_layout (run by RunConfig's validator: no model, no torch) refuses what no machine can
  run: a device outside the inventory, one device given to two processes (unless
  placement.colocate lets the trainer share the generators' devices, for one-GPU machines:
  generators then start again from device 0 and the trainer gets what the engines' memory
  shares leave), an engine wider than
  a machine, trainer ranks unevenly spread over machines.
- make_plan adds memory, by arithmetic from the model's shape (model_shape: the config built on
  the meta device, so the parameter count is exact; the config is read from a local directory,
  the local Hugging Face cache or KNOWN_CONFIGS before the hub is asked): per trainer rank the
  FSDP2-sharded fp32 weights, gradients and AdamW moments plus what is gathered and the
  activations; per engine device the weights and the KV cache that the memory share leaves.
  It refuses a share that cannot hold the weights, a head count that the tensor-parallel size
  does not divide and a KV cache that cannot hold one whole sequence; a max_batch_size above
  the sequences the KV cache holds at full length is clamped (a warning says so): vLLM would
  otherwise admit them and preempt, and an interrupted sequence re-queued behind new ones
  loses its cached prefix.

Numbers marked "estimate" are approximations (activations, vLLM's own reserve); the rest is
exact arithmetic over parameter counts and dtypes. CPU plans print the same processes; memory
there is the host's and is not checked.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
VLLM_RESERVE_BYTES = 2 * GIB  # estimate: vLLM's activation peak and CUDA graphs per device
HEAD_CHUNK_TOKENS = 8192  # scalerl/fp32_head.py: fp32 logits one chunk at a time


class PlacementError(ValueError):
    """A placement that no machine could run; the message names the problem and the fix."""


# -- the layout: devices only ------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    accelerator: str  # "cuda" | "cpu"
    trainer: tuple[int, ...]  # global device per trainer rank (empty on cpu)
    generators: tuple[tuple[int, ...], ...]  # global devices per generator (empty on cpu)
    evaluation: tuple[int, ...] | None  # own devices; None: beside gen0


def detect_accelerator() -> str:
    """'cuda' where a GPU is visible, else 'cpu'. Asks nvidia-smi, not torch: the flow process
    must not initialise CUDA (its children are forked)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "cpu"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "cpu"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return "cuda" if out.returncode == 0 and "GPU" in out.stdout else "cpu"


VISIBLE = "CUDA_VISIBLE_DEVICES"


def parent_devices(environ=None) -> list[str] | None:
    """The devices this process was given: CUDA_VISIBLE_DEVICES's entries (indices or GPU-/MIG-
    UUIDs, kept as written), or None when it is unset (every device of the machine)."""
    value = (os.environ if environ is None else environ).get(VISIBLE)
    if value is None:
        return None
    return [d.strip() for d in value.split(",") if d.strip()]


def gpu_count() -> int:
    """The GPUs this machine shows: `nvidia-smi -L`'s lines (0 without nvidia-smi). Not torch:
    the flow process must not initialise CUDA (see detect_accelerator). Tests fake it."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if out.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def short_list_error(given: list[str], per_node: int) -> PlacementError:
    """A CUDA_VISIBLE_DEVICES list with fewer entries than placement.devices_per_node."""
    if not given:
        return PlacementError(
            f"{VISIBLE} is set and empty: this process sees no device, and placement."
            f"accelerator is cuda. Fix: unset {VISIBLE} or list {per_node} devices in it, or "
            "set placement.accelerator=cpu."
        )
    return PlacementError(
        f"{VISIBLE}={','.join(given)} gives this machine {len(given)} device(s), but "
        f"placement.devices_per_node = {per_node} (a process's local device i is that list's "
        f"i-th entry). Fix: set placement.devices_per_node={len(given)} (with trainer_ranks and "
        f"num_generators that fit), or list {per_node} devices in {VISIBLE}."
    )


def check_inventory(cfg) -> None:
    """Before a run on cuda writes anything: this machine shows at least devices_per_node
    devices, its CUDA_VISIBLE_DEVICES list when set, else nvidia-smi's GPUs. Otherwise a child
    would get a device that is not there and fail inside, after the run started. `scalerl plan`
    does not call it: a plan may be made for another machine."""
    per_node = cfg.placement.devices_per_node
    given = parent_devices()
    if given is not None:
        if len(given) < per_node:
            raise short_list_error(given, per_node)
        return
    found = gpu_count()
    if found == 0:
        raise PlacementError(
            "placement.accelerator = 'cuda', but this machine shows no GPU (nvidia-smi -L). "
            "Fix: run where GPUs are visible, or set placement.accelerator=cpu (or auto)."
        )
    if found < per_node:
        raise PlacementError(
            f"placement.devices_per_node = {per_node}, but this machine shows {found} GPU(s) "
            f"(nvidia-smi -L): its processes would be given devices that are not there. Fix: "
            f"set placement.devices_per_node={found} (with trainer_ranks and num_generators "
            f"that fit, or placement.colocate=true), or run where {per_node} GPUs are visible "
            f"({VISIBLE} chooses them)."
        )


def resolve_accelerator(cfg) -> str:
    acc = cfg.placement.accelerator
    return detect_accelerator() if acc == "auto" else acc


def _where(device: int, per_node: int) -> str:
    return f"device {device} (node {device // per_node}, local {device % per_node})"


def check_layout(cfg) -> None:
    """RunConfig's validator: the devices, which need no model (see the module docstring);
    whether the modes fit together is scalerl/modes.py's."""
    if cfg.placement.accelerator != "cpu":
        layout(cfg, accelerator="cuda")


def layout(cfg, accelerator: str | None = None) -> Layout:
    """Every process's devices; PlacementError for a layout no machine could run."""
    accelerator = accelerator or resolve_accelerator(cfg)
    if accelerator == "cpu":
        return Layout("cpu", (), (), None)
    pl, gens = cfg.placement, cfg.generation.num_generators
    per_node, tp = pl.devices_per_node, pl.tensor_parallel
    total = pl.nodes * per_node
    inventory = f"placement.nodes x devices_per_node = {pl.nodes} x {per_node} = {total} devices"
    if per_node % tp:
        divisors = [d for d in range(1, per_node + 1) if per_node % d == 0]
        raise PlacementError(
            f"placement.tensor_parallel = {tp} does not divide placement.devices_per_node = "
            f"{per_node}: an engine cannot span machines. Fix: use one of {divisors}."
        )
    owner: dict[int, str] = {}

    def take(devices: list[int], who: str, field_name: str) -> tuple[int, ...]:
        for d in devices:
            if not 0 <= d < total:
                raise PlacementError(
                    f"placement.{field_name} names device {d}, but {inventory} (0-{total - 1}). "
                    f"Fix: use devices 0-{total - 1}, or raise placement.nodes."
                )
            if d in owner and not (pl.colocate and "the trainer" in (owner[d], who)):
                raise PlacementError(
                    f"placement: {_where(d, per_node)} is given to both {owner[d]} and {who}. "
                    "Fix: give each process its own devices (or leave the list out to have them "
                    "assigned)."
                )
            owner.setdefault(d, who)
        return tuple(devices)

    trainer_list = pl.trainer_devices
    if trainer_list is None:
        trainer_list = list(range(pl.trainer_ranks))
    elif len(trainer_list) != pl.trainer_ranks:
        raise PlacementError(
            f"placement.trainer_devices lists {len(trainer_list)} devices for placement."
            f"trainer_ranks = {pl.trainer_ranks}. Fix: list one device per rank, or leave "
            "trainer_devices out."
        )
    trainer = take(list(trainer_list), "the trainer", "trainer_devices")
    per_trainer_node: dict[int, int] = {}
    for d in trainer:
        per_trainer_node[d // per_node] = per_trainer_node.get(d // per_node, 0) + 1
    if len(set(per_trainer_node.values())) > 1:
        raise PlacementError(
            f"placement.trainer_devices puts {per_trainer_node} ranks on nodes "
            f"{sorted(per_trainer_node)}: torchrun starts the same number of ranks on every "
            "machine. Fix: give the trainer as many devices on each of its machines."
        )
    evaluation = None
    if pl.evaluation_devices is not None:
        ev = list(pl.evaluation_devices)
        if len(ev) != tp or len({d // per_node for d in ev}) > 1:
            raise PlacementError(
                f"placement.evaluation_devices = {ev} must be placement.tensor_parallel = {tp} "
                "devices of one machine (the evaluation engine is a generator engine). Fix: "
                f"list {tp} devices of one node, or leave it out to run beside gen0."
            )
        evaluation = take(ev, "the evaluation engine", "evaluation_devices")
    need = gens * tp
    if pl.generator_devices is not None:
        glist = list(pl.generator_devices)
        if len(glist) != need:
            raise PlacementError(
                f"placement.generator_devices lists {len(glist)} devices; generation."
                f"num_generators x placement.tensor_parallel = {gens} x {tp} = {need}. Fix: "
                f"list {need} devices, or leave generator_devices out."
            )
        groups = [tuple(glist[i * tp : (i + 1) * tp]) for i in range(gens)]
        for i, g in enumerate(groups):
            if len({d // per_node for d in g}) > 1:
                raise PlacementError(
                    f"placement.generator_devices gives gen{i} devices {list(g)} on two "
                    "machines: an engine cannot span machines. Fix: list each generator's "
                    f"{tp} devices on one node."
                )
            take(list(g), f"generator gen{i}", "generator_devices")
    else:
        groups = []
        for node in range(pl.nodes):
            free = [
                d
                for d in range(node * per_node, (node + 1) * per_node)
                if d not in owner or (pl.colocate and owner[d] == "the trainer")
            ]
            for i in range(0, len(free) - tp + 1, tp):
                if len(groups) < gens:
                    groups.append(tuple(free[i : i + tp]))
        if len(groups) < gens:
            raise PlacementError(
                f"placement: {gens} generators x tensor_parallel {tp} need {need} devices, but "
                f"{inventory} leave {len(groups) * tp} in whole engines beside the trainer's "
                f"{len(trainer)}"
                + (f" and the evaluation's {tp}" if evaluation else "")
                + ". Fix: lower generation.num_generators or placement.trainer_ranks, raise "
                "placement.nodes, or set placement.colocate=true (the trainer shares the "
                "generators' devices)."
            )
        for i, g in enumerate(groups):
            take(list(g), f"generator gen{i}", "generator_devices")
    return Layout("cuda", trainer, tuple(groups), evaluation)


# -- the model's shape -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    tied: bool
    layer_params: int  # one decoder layer
    outside_layers: int  # embeddings, final norm, (untied) head

    @classmethod
    def from_hf_config(cls, hf_config, name: str) -> ModelShape:
        """Exact counts: the model built on the meta device (no memory, no weights)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        params = sum(p.numel() for p in model.parameters())
        layer = sum(p.numel() for p in model.base_model.layers[0].parameters())
        layers = int(hf_config.num_hidden_layers)
        heads = int(hf_config.num_attention_heads)
        hidden = int(hf_config.hidden_size)
        return cls(
            name=name,
            params=params,
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(hf_config, "head_dim", None) or hidden // heads),
            vocab=int(hf_config.vocab_size),
            intermediate=int(getattr(hf_config, "intermediate_size", 4 * hidden)),
            tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
            layer_params=layer,
            outside_layers=params - layers * layer,
        )


# The shapes of hub models a plan is often made for, so that `scalerl plan` works offline when
# their config.json is not in the local cache (the published config.json values; the parameter
# count is still computed, not copied). A cached config.json is read first.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-8B": {
        "model_type": "qwen3",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen3-0.6B": {
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen3-1.7B": {
        "model_type": "qwen3",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen3-4B": {
        "model_type": "qwen3",
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-0.5B": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
}


def model_shape(name_or_path: str, revision: str | None = None) -> ModelShape:
    """The shape of the run's model, looked up without the network first: a built-in, a local
    directory, a hub id whose config.json is in the local Hugging Face cache (HF_HUB_CACHE /
    HF_HOME, at `revision`, default main), a hub id of KNOWN_CONFIGS; only then the hub.
    ModelLoadError (one line with the download command) when none has it and the hub cannot be
    reached (HF_HUB_OFFLINE=1, or a failed fetch)."""
    from transformers import AutoConfig

    from scalerl.models import _load_config, _looks_local

    if name_or_path.startswith("builtin:"):
        return ModelShape.from_hf_config(_builtin_config(), name_or_path)
    if _looks_local(name_or_path):
        return ModelShape.from_hf_config(_load_config(name_or_path), name_or_path)
    cached = cached_config_file(name_or_path, revision)
    if cached is not None:  # a local directory for transformers: never the network
        return ModelShape.from_hf_config(_load_config(os.path.dirname(cached)), name_or_path)
    if name_or_path in KNOWN_CONFIGS:
        known = dict(KNOWN_CONFIGS[name_or_path])
        hf = AutoConfig.for_model(known.pop("model_type"), **known)
        return ModelShape.from_hf_config(hf, name_or_path)
    if hub_offline():
        raise _not_cached(name_or_path, revision, "HF_HUB_OFFLINE is set")
    try:
        return ModelShape.from_hf_config(_load_config(name_or_path, revision), name_or_path)
    except ValueError as e:  # ModelLoadError: not reachable, not found, gated
        cause = e.__cause__ or e
        raise _not_cached(
            name_or_path, revision, f"fetching it failed: {type(cause).__name__}"
        ) from e


def _builtin_config():
    """build_tiny_model's defaults (runtime/common.py builds both built-ins with them)."""
    from transformers import Qwen2Config

    from scalerl.models import build_tiny_tokenizer

    return Qwen2Config(
        vocab_size=len(build_tiny_tokenizer()),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    )


def hub_cache_dir() -> str:
    """The Hugging Face hub cache as huggingface_hub resolves it, read from the environment now
    (huggingface_hub reads it once, at import): HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    hub = os.path.join(home, "hub")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or hub
    return os.path.expandvars(os.path.expanduser(hub))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def cached_config_file(repo_id: str, revision: str | None = None) -> str | None:
    """Path of the hub model's config.json in the local cache at `revision` (branch, tag or
    commit; None: main), or None when it is not there. Reads files only."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(
            repo_id, "config.json", cache_dir=hub_cache_dir(), revision=revision
        )
    except ValueError:  # not a valid repo id (e.g. a mistyped local path)
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


def _not_cached(name: str, revision: str | None, why: str) -> ValueError:
    from scalerl.models import ModelLoadError

    rev = f" --revision {revision}" if revision else ""
    at = f" at revision {revision}" if revision else ""
    return ModelLoadError(
        f"the config.json of model {name}{at} is not in the local Hugging Face cache "
        f"({hub_cache_dir()}) and {why}. Fix: download it with `hf download {name} "
        f"config.json{rev}` where the hub is reachable (HF_HOME / HF_HUB_CACHE pointing at "
        "this cache), or set model.name_or_path to a local directory holding config.json."
    )


# -- the plan: processes and memory -------------------------------------------------------------


@dataclass
class PlannedProcess:
    name: str  # trainer@node0, gen0, eval
    role: str  # trainer | generator | evaluation
    node: int
    devices: tuple[int, ...]  # local indices on its node (empty on cpu); env holds the ids
    env: dict[str, str]
    ranks: tuple[int, ...] = ()  # global trainer ranks started on this node
    memory: dict[str, int] = field(default_factory=dict)  # bytes per device, by component

    @property
    def memory_total(self) -> int:
        return sum(self.memory.values())


@dataclass
class Plan:
    accelerator: str
    processes: list[PlannedProcess]
    shape: ModelShape | None
    max_num_seqs: int  # what each generator engine is started with
    kv_tokens_per_engine: int | None
    warnings: list[str]
    visible: list[str] | None = None  # node 0's CUDA_VISIBLE_DEVICES, composed into the envs

    def process(self, name: str) -> PlannedProcess:
        return next(p for p in self.processes if p.name == name)

    def to_json(self) -> dict:
        out = asdict(self)
        for p in out["processes"]:
            p["memory_total"] = sum(p["memory"].values())
        return out

    def render(self) -> str:
        lines = [f"accelerator: {self.accelerator}"]
        if self.shape is not None:
            s = self.shape
            lines.append(
                f"model: {s.name}, {s.params:,} parameters ({s.layers} layers, hidden "
                f"{s.hidden}, {s.heads} heads / {s.kv_heads} KV heads, vocabulary {s.vocab:,})"
            )
        if self.visible is not None:
            lines.append(
                f"node 0 devices: {VISIBLE}={','.join(self.visible)} here; local device i is "
                "its i-th entry"
            )
        lines.append(f"generator engines: max_num_seqs {self.max_num_seqs}")
        if self.kv_tokens_per_engine is not None:
            lines.append(f"KV cache per engine: {self.kv_tokens_per_engine:,} tokens")
        for p in self.processes:
            where = f"node {p.node}"
            if p.devices:
                where += f", CUDA_VISIBLE_DEVICES={p.env.get('CUDA_VISIBLE_DEVICES')}"
            if len(p.ranks) == 1:
                where += f", rank {p.ranks[0]}"
            elif p.ranks:
                where += f", ranks {p.ranks[0]}-{p.ranks[-1]} (torchrun)"
            lines.append(f"{p.name}: {where}")
            for part, value in p.memory.items():
                lines.append(f"    {part:<40} {value / GIB:9.2f} GiB")
            if p.memory:
                lines.append(f"    {'total per device':<40} {p.memory_total / GIB:9.2f} GiB")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def _visible(
    devices: tuple[int, ...], per_node: int, given: list[str] | None = None
) -> dict[str, str]:
    """A process's CUDA_VISIBLE_DEVICES: its node-local indices, or with `given` (the list the
    starting process has on node 0) the entries at those positions, so children land on the
    devices the run was given and not on the machine's first ones."""
    local = [d % per_node for d in devices]
    if given is None or devices[0] // per_node != 0:
        return {VISIBLE: ",".join(map(str, local))}
    return {VISIBLE: ",".join(given[i] for i in local)}


def make_plan(
    cfg,
    shape: ModelShape | None = None,
    *,
    accelerator: str | None = None,
    visible: list[str] | None = None,
) -> Plan:
    """Each process, its devices and (with a shape, on cuda) its memory; PlacementError for a
    placement the memory cannot hold. `visible`: the CUDA_VISIBLE_DEVICES list of the process
    that starts node 0's children (parent_devices()); their lists are composed with it, and a
    list shorter than devices_per_node is refused. None: bare node-local indices (what a child
    that sizes its own engine from the plan needs: it already sees only its devices)."""
    lay = layout(cfg, accelerator)
    pl, gen = cfg.placement, cfg.generation
    per_node = pl.devices_per_node
    if lay.accelerator == "cpu":
        visible = None
    elif visible is not None and len(visible) < per_node:
        raise short_list_error(visible, per_node)
    procs: list[PlannedProcess] = []
    warnings: list[str] = []
    if lay.accelerator == "cpu":
        procs.append(
            PlannedProcess("trainer@node0", "trainer", 0, (), {}, tuple(range(pl.trainer_ranks)))
        )
        procs += [
            PlannedProcess(f"gen{i}", "generator", 0, (), {}) for i in range(gen.num_generators)
        ]
        procs.append(PlannedProcess("eval", "evaluation", 0, (), {}))
        return Plan("cpu", procs, shape, gen.max_batch_size, None, warnings)
    nodes = sorted({d // per_node for d in lay.trainer})
    ranks_per_node = len(lay.trainer) // len(nodes)
    for n, node in enumerate(nodes):
        mine = tuple(d for d in lay.trainer if d // per_node == node)
        ranks = tuple(range(n * ranks_per_node, (n + 1) * ranks_per_node))
        procs.append(
            PlannedProcess(
                f"trainer@node{node}",
                "trainer",
                node,
                tuple(d % per_node for d in mine),
                _visible(mine, per_node, visible),
                ranks,
            )
        )
    for i, g in enumerate(lay.generators):
        procs.append(
            PlannedProcess(
                f"gen{i}",
                "generator",
                g[0] // per_node,
                tuple(d % per_node for d in g),
                _visible(g, per_node, visible),
            )
        )
    ev = lay.evaluation if lay.evaluation is not None else lay.generators[0]
    procs.append(
        PlannedProcess(
            "eval",
            "evaluation",
            ev[0] // per_node,
            tuple(d % per_node for d in ev),
            _visible(ev, per_node, visible),
        )
    )
    max_num_seqs, kv_tokens = gen.max_batch_size, None
    if shape is not None:
        max_num_seqs, kv_tokens = _memory(cfg, lay, shape, procs, warnings)
    return Plan("cuda", procs, shape, max_num_seqs, kv_tokens, warnings, visible)


def _activations(cfg, shape: ModelShape, cdt: int, tokens: int) -> int:
    """A trainer's activations for a micro-batch of `tokens` (an estimate)."""
    if cfg.model.gradient_checkpointing:  # each layer's input kept, one layer recomputed
        return tokens * shape.hidden * cdt * shape.layers + tokens * _layer_act(shape) * cdt
    return tokens * _layer_act(shape) * cdt * shape.layers


def _full_trainer(cfg, shape: ModelShape, world: int, device, cdt, tokens) -> dict:
    """A full-weight trainer rank: FSDP2 fully sharded, fp32 master weights, gradients and AdamW
    moments (scalerl/trainer/distributed.py)."""
    trainer = {
        "weights fp32 (1/ranks)": 4 * shape.params // world,
        "gradients fp32 (1/ranks)": 4 * shape.params // world,
        "AdamW moments fp32 (1/ranks)": 8 * shape.params // world,
        # FSDP2 gathers one decoder layer at a time (and prefetches the next) in the compute
        # dtype; the root (embeddings, norm, head) stays gathered through the step, in fp32
        # with the FP32 head (scalerl/trainer/distributed.py: the head's weights stay fp32)
        "gathered layers (compute dtype) + root": 2 * shape.layer_params * cdt
        + shape.outside_layers * (4 if cfg.algorithm.fp32_lm_head else cdt),
        "fp32 head logits, one chunk": min(tokens, HEAD_CHUNK_TOKENS) * shape.vocab * 4 * 2,
    }
    trainer["activations (estimate)"] = _activations(cfg, shape, cdt, tokens)
    if 16 * shape.params / world > device:
        raise PlacementError(
            f"the trainer's sharded fp32 weights, gradients and AdamW moments alone take "
            f"{16 * shape.params / world / GIB:.1f} GiB per rank over {world} ranks "
            f"({shape.params:,} parameters x 16 bytes), above placement.device_memory_gib = "
            f"{cfg.placement.device_memory_gib:g}. Fix: raise placement.trainer_ranks to at least "
            f"{math.ceil(16 * shape.params / device)}."
        )
    return trainer


def _lora_trainer(cfg, shape: ModelShape, device, cdt, tokens) -> dict:
    """The trainer of a LoRA run (model.lora, scalerl/lora.py): one process, the base frozen in
    model.dtype, the adapters' fp32 weights, gradients and AdamW moments (16 bytes each), the
    activations of the body's backward (the adapters need the inputs of every adapted layer)."""
    from scalerl.lora import adapter_param_count

    adapter = adapter_param_count(shape, cfg.model.lora)
    trainer = {
        "base weights, frozen (model.dtype)": shape.params * cdt,
        "adapter weights, gradients, AdamW moments fp32": 16 * adapter,
        "fp32 head logits, one chunk": min(tokens, HEAD_CHUNK_TOKENS) * shape.vocab * 4 * 2,
    }
    if cfg.algorithm.fp32_lm_head and cdt != 4:  # the frozen head's weight, cast for the matmul
        trainer["fp32 copy of the head"] = shape.vocab * shape.hidden * 4
    trainer["activations (estimate)"] = _activations(cfg, shape, cdt, tokens)
    fixed = trainer["base weights, frozen (model.dtype)"] + 16 * adapter
    if fixed > device:
        raise PlacementError(
            f"the LoRA trainer's frozen base ({shape.params:,} parameters x {cdt} bytes) and "
            f"adapters ({adapter:,} parameters x 16 bytes) alone take {fixed / GIB:.1f} GiB, "
            f"above placement.device_memory_gib = {cfg.placement.device_memory_gib:g}. Fix: a "
            "device with more memory, or a smaller model (adapters are not sharded over ranks "
            "yet)."
        )
    return trainer


def _memory(cfg, lay: Layout, shape: ModelShape, procs, warnings) -> tuple[int, int]:
    pl, gen, ev = cfg.placement, cfg.generation, cfg.evaluation
    tp, device = pl.tensor_parallel, pl.device_memory_gib * GIB
    cdt = _BYTES[cfg.model.dtype]
    world = len(lay.trainer)
    for name, count in (("attention heads", shape.heads), ("KV heads", shape.kv_heads)):
        if count % tp and not (name == "KV heads" and tp % count == 0):
            raise PlacementError(
                f"placement.tensor_parallel = {tp} does not divide the model's {count} "
                f"{name} ({shape.name}). Fix: use a tensor-parallel size that divides "
                f"{shape.heads} and {shape.kv_heads}."
            )
    # -- trainer rank: FSDP2 fully sharded, fp32 master weights (scalerl/trainer/distributed.py)
    tokens = cfg.trainer.micro_batch_tokens
    if cfg.model.lora is not None:  # one rank: a frozen base in model.dtype, fp32 adapters
        trainer = _lora_trainer(cfg, shape, device, cdt, tokens)
    else:
        trainer = _full_trainer(cfg, shape, world, device, cdt, tokens)
    for p in procs:
        if p.role == "trainer":
            p.memory = dict(trainer)
    room = device
    if pl.colocate:  # the trainer runs beside the engines on the same devices
        share = gen.gpu_memory_utilization + (
            ev.gpu_memory_utilization if pl.evaluation_devices is None else 0.0
        )
        room = max(0.0, (1.0 - share) * device)
    if pl.colocate and sum(trainer.values()) > room:
        warnings.append(
            f"placement.colocate: the trainer's estimate, {sum(trainer.values()) / GIB:.1f} GiB "
            f"per rank, is above the {room / GIB:.1f} GiB that generation and evaluation leave "
            "on its devices: lower their gpu_memory_utilization or trainer.micro_batch_tokens"
        )
    elif sum(trainer.values()) > device:
        warnings.append(
            f"the trainer's estimate, {sum(trainer.values()) / GIB:.1f} GiB per rank, is above "
            f"the device's {pl.device_memory_gib:g} GiB: lower trainer.micro_batch_tokens "
            f"({tokens}), "
            + ("" if cfg.model.gradient_checkpointing else "turn model.gradient_checkpointing on, ")
            + "or add ranks"
        )
    # -- generator engine devices: weights, then the KV cache in what the share leaves
    weights = shape.params * cdt // tp
    kv_heads_per_device = max(1, shape.kv_heads // tp)
    kv_per_token = 2 * shape.layers * kv_heads_per_device * shape.head_dim * cdt
    budget = gen.gpu_memory_utilization * device
    if weights + VLLM_RESERVE_BYTES > budget:
        raise PlacementError(
            f"generation.gpu_memory_utilization = {gen.gpu_memory_utilization:g} of "
            f"{pl.device_memory_gib:g} GiB = {budget / GIB:.1f} GiB per device cannot hold "
            f"{shape.name}'s weights, {weights / GIB:.1f} GiB per device at tensor_parallel "
            f"{tp} ({shape.params:,} x {cdt} bytes), plus vLLM's ~{VLLM_RESERVE_BYTES / GIB:.0f} "
            "GiB. Fix: raise generation.gpu_memory_utilization or placement.tensor_parallel."
        )
    kv_tokens = int((budget - weights - VLLM_RESERVE_BYTES) // kv_per_token)
    seq_len = gen.max_prompt_tokens + gen.max_new_tokens
    fit = kv_tokens // seq_len
    if fit < 1:
        raise PlacementError(
            f"the KV cache of a generator engine holds {kv_tokens:,} tokens, less than one "
            f"sequence of generation.max_prompt_tokens + max_new_tokens = {seq_len:,}. Fix: "
            "raise generation.gpu_memory_utilization or placement.tensor_parallel, or lower "
            "the lengths."
        )
    max_num_seqs = gen.max_batch_size
    if fit < gen.max_batch_size:
        max_num_seqs = fit
        warnings.append(
            f"generation.max_batch_size = {gen.max_batch_size} is above the {fit} sequences "
            f"of {seq_len:,} tokens that an engine's KV cache ({kv_tokens:,} tokens) holds: "
            f"engines start with max_num_seqs = {fit} (clamped, not refused)"
        )
    engine = {
        "weights (compute dtype, 1/tensor_parallel)": weights,
        "KV cache": kv_tokens * kv_per_token,
        "vLLM activations and graphs (estimate)": VLLM_RESERVE_BYTES,
    }
    for p in procs:
        if p.role == "generator":
            p.memory = dict(engine)
    # -- the evaluation engine: its own devices, or a share beside gen0
    share = gen.gpu_memory_utilization if lay.evaluation is not None else ev.gpu_memory_utilization
    ev_budget = share * device
    if weights + VLLM_RESERVE_BYTES > ev_budget:
        where = (
            "on placement.evaluation_devices"
            if lay.evaluation is not None
            else "beside gen0 (evaluation.gpu_memory_utilization)"
        )
        raise PlacementError(
            f"the evaluation engine {where} gets {share:g} of {pl.device_memory_gib:g} GiB = "
            f"{ev_budget / GIB:.1f} GiB per device, which cannot hold {shape.name}'s weights, "
            f"{weights / GIB:.1f} GiB per device, plus vLLM's ~{VLLM_RESERVE_BYTES / GIB:.0f} "
            "GiB. Fix: give it its own devices (placement.evaluation_devices) or raise "
            "evaluation.gpu_memory_utilization (and lower generation.gpu_memory_utilization)."
        )
    for p in procs:
        if p.role == "evaluation":
            p.memory = {
                "weights (compute dtype, 1/tensor_parallel)": weights,
                "KV cache": int(ev_budget - weights - VLLM_RESERVE_BYTES),
                "vLLM activations and graphs (estimate)": VLLM_RESERVE_BYTES,
            }
    return max_num_seqs, kv_tokens


def _layer_act(shape: ModelShape) -> int:
    """Values per token kept for backward by one decoder layer (estimate): norms, q/k/v,
    attention output, the MLP's gate, up and product, residuals."""
    attn = shape.heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim
    return 6 * shape.hidden + 2 * attn + 3 * shape.intermediate
