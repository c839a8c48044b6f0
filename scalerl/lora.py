"""LoRA adapters (config `model.lora`), built with peft: what the trainer trains, what a version
of a LoRA run holds, and how an engine takes one in place.

    peft_model = attach(model, cfg.model.lora)   # trainer: adapters injected, all else frozen
    model = peft_model.get_base_model()          # the same module object, adapters inside
    save_adapter(staged / ADAPTER_DIR, adapter_state(peft_model), cfg.model.lora)  # a version
    copy_adapter(engine_model, read_adapter(version_dir))   # an engine: in place, no realloc

Versions of a LoRA run. Version 0 is the base model (prepare_run publishes it, as in a
full-weight run) with the initial adapter beside it in ADAPTER_DIR; every later version holds
only ADAPTER_DIR: adapter_config.json and adapter_model.safetensors, in peft's own format (keys
``base_model.model.<module>.lora_A.weight``), which peft, vLLM and transformers all read. The
adapter lives in a subdirectory so that transformers, loading version 0 as a model, never
mistakes it for an adapter-only checkpoint. The initial adapter is peft's default (A random, B
zero, so version 0's policy is exactly the base) drawn once, at prepare, from the trainer's
seed: trainer, generators and evaluations all start from the same tensors.

The LM head is never adapted (config validation): it stays the base model's, frozen, and keeps
its FP32 matmul in trainer and generator. Checkpoints hold the adapter in float32 (the trainer's
copy, bit-exact), the optimizer state of the adapter parameters only, and the step.

torch, peft and vLLM are imported inside the functions that need them: the flow process asks
version_complete without any of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ADAPTER_DIR = "adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class LoraError(ValueError):
    """An adapter that cannot be built or loaded as configured; the message says the fix."""


TRAINED = "scalerl_trained_modules"  # attribute of a model: its fully trained modules
_FROZEN = ("embed_tokens.weight", "lm_head.weight")


def peft_config(lora):
    """peft's LoraConfig for the run's `model.lora` (scalerl.config.LoraConfig), as injected:
    trained_modules are not wrapped (peft's modules_to_save would rename their parameters);
    they keep their place and names and are only unfrozen (mark_trained)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach(model, lora, name: str = "the model"):
    """Inject adapters into `model` in place (peft's get_peft_model) and freeze everything but
    them and model.lora.trained_modules; returns the PeftModel (its get_base_model() is
    `model`, now holding the adapters)."""
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, peft_config(lora))
    except ValueError as e:  # peft's NoMatchingPeftModuleError is a ValueError
        raise LoraError(_no_targets_message(model, lora, name, e)) from e
    mark_trained(model, lora.trained_modules, name)
    bad = [n for n in trained_params(model) if n.endswith(_FROZEN) or ".base_layer." in n]
    if bad:
        raise LoraError(
            f"model.lora.trained_modules = {list(lora.trained_modules)} reaches {bad[0]} of "
            f"{name}, which stays frozen (the embedding and LM head) or gets an adapter. Fix: "
            "name modules that hold neither, e.g. 'norm'."
        )
    trained = {id(p) for p in trained_params(model).values()}
    for n, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(n) or id(p) in trained)
    return peft_model


def mark_trained(model, modules, name: str = "the model") -> None:
    """Record which modules of `model` are trained in full (peft's modules_to_save matching:
    a module whose name ends with one of them); LoraError when one matches nothing."""
    names = [n for n, _ in model.named_modules()]
    for m in modules:
        if not any(n.endswith(m) for n in names):
            raise LoraError(
                f"model.lora.trained_modules names {m!r}, which is no module of {name}. Fix: "
                "give module names or name suffixes of the model (e.g. 'norm'), or leave it empty."
            )
    setattr(model, TRAINED, tuple(modules))


def trained_params(model) -> dict[str, torch.nn.Parameter]:
    """The parameters of the fully trained modules, by their name in the model."""
    modules = getattr(model, TRAINED, ())
    out = {}
    for n, module in model.named_modules():
        if modules and any(n.endswith(m) for m in modules):
            for pn, p in module.named_parameters():
                if not is_adapter_param(pn):
                    out[f"{n}.{pn}"] = p
    return out


def _no_targets_message(model, lora, name: str, error: Exception) -> str:
    import torch

    leaves = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n
        }
    )
    return (
        f"model.lora.target_modules = {list(lora.target_modules)} names no module of {name} "
        f"({type(error).__name__}). Fix: pick from its linear layers: {', '.join(leaves)}."
    )


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _peft_key(param_name: str) -> str:
    """peft's saved key of an injected adapter parameter (adapter name 'default' dropped)."""
    return _PREFIX + param_name.replace(".default.", ".")


def adapter_params(model) -> dict[str, torch.nn.Parameter]:
    """What a version holds of a model with adapters injected, by peft's saved key: the adapter
    parameters and those of the fully trained modules."""
    out = {_peft_key(n): p for n, p in model.named_parameters() if is_adapter_param(n)}
    out.update({_PREFIX + n: p for n, p in trained_params(model).items()})
    return out


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter tensors (live, not copies) by peft's saved key; `model` a PeftModel or the
    module it wraps."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k: p.detach() for k, p in adapter_params(inner).items()}


def has_adapters(model) -> bool:
    return any(is_adapter_param(n) for n, _ in model.named_parameters())


def adapter_config_dict(lora, trained=None) -> dict:
    """adapter_config.json as peft writes it, of `model.lora` or of peft's own LoraConfig;
    the fully trained modules as peft's modules_to_save (peft loads them so)."""
    cfg = (lora if hasattr(lora, "to_dict") else peft_config(lora)).to_dict()
    if trained is None:
        trained = getattr(lora, "trained_modules", None)
    cfg["modules_to_save"] = list(trained) or None if trained is not None else None
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def save_adapter(directory: str | Path, state: dict[str, torch.Tensor], lora, trained=None) -> Path:
    """Write an adapter directory (adapter_config.json + adapter_model.safetensors); trained:
    the fully trained modules (default: `lora`'s trained_modules)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = adapter_config_dict(lora, trained)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))
    return out


def adapter_dir(version_dir: str | Path) -> Path | None:
    """The adapter directory of a version directory, None when it holds none (a full version)."""
    d = Path(version_dir) / ADAPTER_DIR
    return d if (d / CONFIG_FILE).is_file() else None


def is_adapter_only(version_dir: str | Path) -> bool:
    """Whether a version directory holds an adapter and no model (versions >= 1 of LoRA runs)."""
    d = Path(version_dir)
    return adapter_dir(d) is not None and not (d / "config.json").is_file()


def version_complete(version_dir: str | Path) -> bool:
    """Whether a local version directory holds a model or an adapter (a finished download)."""
    d = Path(version_dir)
    return (d / "config.json").is_file() or adapter_dir(d) is not None


def read_adapter(version_dir: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a version directory (or of an adapter directory itself)."""
    from safetensors.torch import load_file

    d = Path(version_dir)
    d = adapter_dir(d) or d
    if not (d / WEIGHTS_FILE).is_file():
        raise LoraError(
            f"{d} holds no {WEIGHTS_FILE}. Fix: publish LoRA versions with the trainer of a run "
            "whose config sets model.lora."
        )
    return load_file(str(d / WEIGHTS_FILE))


def read_adapter_config(version_dir: str | Path) -> dict:
    d = Path(version_dir)
    d = adapter_dir(d) or d
    return json.loads((d / CONFIG_FILE).read_text())


def copy_adapter(model, tensors: dict[str, torch.Tensor], where: str = "the adapter") -> None:
    """Copy adapter tensors into the adapter parameters of `model`, in place (same storage, so
    whatever holds the parameters keeps working). One line when they do not fit."""
    from scalerl.models import copy_present, state_misfit

    params = adapter_params(model)
    # a fully trained module absent from `tensors` keeps its values (an adapter written before
    # version 0 carried the base's)
    optional = {k for k in params if not is_adapter_param(k)}
    misfit = state_misfit(params, tensors, optional=optional, shown=2)
    if misfit:
        raise LoraError(
            f"{where} does not fit the model's adapters ({misfit}). Fix: load adapters of this "
            "run's model.lora (rank and target_modules) on its base model."
        )
    copy_present(params, tensors)


def check_targets(model_dir: str | Path, lora, name: str | None = None) -> None:
    """Raise LoraError (one line) when model.lora.target_modules names no module of the model at
    `model_dir` (`name`: how the config names it): the architecture is built on the meta
    device, no weights read."""
    _meta_peft_model(model_dir, lora, name)


def _meta_peft_model(model_dir: str | Path, lora, name: str | None = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return attach(model, lora, name or str(model_dir))


def initial_adapter(model_dir: str | Path, lora, seed: int) -> dict[str, torch.Tensor]:
    """Version 0's adapter: peft's default initialisation (A kaiming-uniform, B zero) for the
    model at `model_dir`, drawn from `seed`. The model is built on the meta device (no weights
    read, no memory for them); only the adapter tensors are materialised, on the CPU. Raises
    LoraError when target_modules names no module of the model."""
    import torch
    from peft.tuners.lora import LoraLayer

    peft_model = _meta_peft_model(model_dir, lora)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for _, module in sorted(peft_model.named_modules(), key=lambda nm: nm[0]):
            if isinstance(module, LoraLayer):
                module.lora_A.to_empty(device="cpu")
                module.lora_B.to_empty(device="cpu")
                module.reset_lora_parameters("default", True)
    finally:
        torch.set_rng_state(generator_state)
    out = {k: v.clone() for k, v in adapter_state(peft_model).items() if is_adapter_param(k)}
    # fully trained modules start as the base's own: read from its safetensors (the meta model
    # has none), so version 0 restores them in an engine that has held a later version
    names = list(trained_params(peft_model.get_base_model()))
    if names:
        out.update({_PREFIX + n: t for n, t in _base_tensors(Path(model_dir), names).items()})
    return out


def _base_tensors(model_dir: Path, names: list[str]) -> dict:
    """The tensors `names` from the safetensors files of a model directory."""
    from safetensors import safe_open

    found = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not iterable
                if key in names:
                    found[key] = st.get_tensor(key)
    missing = sorted(set(names) - set(found))
    if missing:
        raise LoraError(
            f"{model_dir} has no tensor {missing[0]} of model.lora.trained_modules. Fix: name "
            "modules whose weights the model's safetensors hold."
        )
    return found


def base_params(model) -> dict:
    """For a model with adapters injected: its base parameters by the name a full checkpoint
    uses (peft renames an adapted layer's weight to ``<module>.base_layer.weight``)."""
    return {
        n.replace(".base_layer.", "."): p
        for n, p in model.named_parameters()
        if not is_adapter_param(n)
    }


def adapter_param_count(shape, lora) -> int:
    """Parameters of the adapters on a model of `shape` (scalerl.placement.ModelShape): r x
    (in + out) per adapted projection of the Qwen/Llama layer, for each target_modules name it
    has (a name it lacks adds none; fully trained modules are not counted: norms are small)."""
    h, q, kv, m = (
        shape.hidden,
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
        shape.intermediate,
    )
    dims = {
        "q_proj": h + q,
        "k_proj": h + kv,
        "v_proj": h + kv,
        "o_proj": q + h,
        "gate_proj": h + m,
        "up_proj": h + m,
        "down_proj": m + h,
    }
    return lora.rank * shape.layers * sum(dims.get(t, 0) for t in lora.target_modules)


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise LoraError(f"model.lora.rank = {rank} is above vLLM's 512. Fix: a rank of at most 512.")
