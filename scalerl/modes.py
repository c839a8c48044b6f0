"""Whether the run's modes fit together: the one place that checks them, run by RunConfig's
validator before anything starts (no model, no torch, no machine).

The modes: the weight transport (weights.transport), the engine (generation.engine), where
roles run (placement: trainer ranks, trainer and generator deployments, accelerator), how the
flow runs them (pipeline.isolation, pipeline.stage_tasks) and the store (storage.url). A mode's
own implementation is picked elsewhere, once, by its factory (runtime/transports,
runtime/generation.py, tasks/stage_drivers.py, tasks/roles.py); what the machine itself must
offer (a CUDA device for nccl, the devices and memory of the plan) is checked when a run starts
(runtime/common.py check_placement). Each error is one line naming the clash and the fix.
"""

from __future__ import annotations


def check_modes(cfg) -> None:
    """Raise ValueError (one line with the fix) for modes that cannot work together. cfg: a
    RunConfig (scalerl/config.py, whose validator calls this)."""
    _check_engine(cfg)
    _check_processes(cfg)
    _check_transport(cfg)


def _check_engine(cfg) -> None:
    lora = cfg.model.lora
    if lora is not None and lora.trained_modules and cfg.generation.engine != "transformers":
        raise ValueError(
            f"model.lora.trained_modules = {lora.trained_modules} trains those modules in full, "
            f"but generation.engine = {cfg.generation.engine!r}: vLLM serves LoRA adapters "
            "without fully trained modules. Fix: generation.engine=transformers, or leave "
            "model.lora.trained_modules empty."
        )
    shares = cfg.generation.gpu_memory_utilization + cfg.evaluation.gpu_memory_utilization
    beside = cfg.placement.evaluation_devices is None  # else the evaluation has its own devices
    if cfg.generation.engine != "transformers" and beside and shares > 0.95:
        raise ValueError(
            f"generation.gpu_memory_utilization = {cfg.generation.gpu_memory_utilization} + "
            f"evaluation.gpu_memory_utilization = {cfg.evaluation.gpu_memory_utilization} = "
            f"{shares:.2f} is above 0.95: with vLLM the evaluation engine runs beside the "
            "generator's on the same accelerator. Fix: lower one of the two."
        )


def _check_processes(cfg) -> None:
    """Roles as processes, and roles on other machines."""
    pl = cfg.placement
    if cfg.model.lora is not None and pl.trainer_ranks > 1:
        raise ValueError(
            f"model.lora trains adapters in one trainer process, but placement.trainer_ranks = "
            f"{pl.trainer_ranks}: sharding adapters over ranks is not built yet. Fix: set "
            "placement.trainer_ranks=1 (an adapter's optimizer state is small), or remove "
            "model.lora."
        )
    if pl.trainer_ranks > 1 and (
        cfg.pipeline.isolation == "thread" or cfg.storage.url.startswith("memory://")
    ):
        raise ValueError(
            f"placement.trainer_ranks = {pl.trainer_ranks} needs one process per rank, but "
            + (
                "pipeline.isolation = thread runs the trainer on a thread"
                if cfg.pipeline.isolation == "thread"
                else f"storage.url = {cfg.storage.url!r} lives in one process"
            )
            + ". Fix: set pipeline.isolation=process and a local or s3:// store, or "
            "placement.trainer_ranks=1."
        )
    if pl.trainer_deployment is not None:
        if pl.trainer_ranks % pl.nodes:
            raise ValueError(
                f"placement.trainer_deployment runs the trainer on placement.nodes = {pl.nodes} "
                f"nodes with the same number of ranks each, but placement.trainer_ranks = "
                f"{pl.trainer_ranks} does not divide by {pl.nodes}. Fix: make trainer_ranks a "
                "multiple of nodes."
            )
        if cfg.storage.url.startswith("memory://") or cfg.pipeline.isolation == "thread":
            raise ValueError(
                "placement.trainer_deployment starts trainer nodes as flow runs elsewhere, which "
                "needs pipeline.isolation=process and a store every machine reaches (s3://, or "
                "a path every machine mounts). Fix: set them, or leave trainer_deployment unset."
            )
    remote = pl.generators_deployment
    if remote is not None and cfg.storage.url.startswith("memory://"):
        raise ValueError(
            f"placement.generators_deployment = {remote!r} starts generators as flow runs "
            f"elsewhere, but storage.url = {cfg.storage.url!r} lives in this process. Fix: an "
            "s3:// store (or a path every machine mounts), or no generators_deployment."
        )


def _check_transport(cfg) -> None:
    """Weight transports that cannot work with the rest of the config."""
    w, engine = cfg.weights, cfg.generation.engine
    if w.transport == "local" and cfg.placement.nodes > 1:
        raise ValueError(
            f"weights.transport = 'local' writes each version to a directory of one node, but "
            f"placement.nodes = {cfg.placement.nodes}. Fix: weights.transport=store (or nccl on "
            "GPUs), or placement.nodes=1."
        )
    if w.transport == "local" and cfg.storage.url.startswith("memory://"):
        raise ValueError(
            "weights.transport = 'local' needs the roles to share a node's disk, but "
            f"storage.url = {cfg.storage.url!r} lives in one process. Fix: "
            "weights.transport=store, or a local or s3:// store."
        )
    if cfg.placement.trainer_deployment is not None and w.transport == "local":
        raise ValueError(
            "weights.transport = 'local' keeps weights on the run flow's machine, but "
            "placement.trainer_deployment trains elsewhere. Fix: weights.transport=store "
            "(or nccl on GPUs)."
        )
    remote = cfg.placement.generators_deployment
    if remote is not None and w.transport == "local":
        raise ValueError(
            f"weights.transport = 'local' keeps weights in a directory of this node, which "
            f"generators started through placement.generators_deployment = {remote!r} (other "
            "machines) cannot read. Fix: weights.transport=store (or nccl on GPUs)."
        )
    if w.transport == "nccl" and (engine == "transformers" or cfg.placement.accelerator == "cpu"):
        raise ValueError(
            "weights.transport = 'nccl' sends weights GPU to GPU with vLLM's NCCL weight-transfer "
            f"engine, but generation.engine = {engine!r} and placement.accelerator = "
            f"{cfg.placement.accelerator!r}. Fix: on CPU use weights.transport=local (one node) "
            "or store; nccl needs a vLLM engine on CUDA."
        )
    if w.transport == "nccl" and cfg.model.lora is not None:
        raise ValueError(
            "weights.transport = 'nccl' broadcasts full weights, but model.lora publishes "
            "each version as an adapter (a few MB to a few hundred). Fix: "
            "weights.transport=local (one node) or store."
        )
    if w.transport == "nccl" and cfg.placement.colocate:
        _check_nccl_colocate(cfg)


def _check_nccl_colocate(cfg) -> None:
    """NCCL puts one rank per device in a communicator: trainer rank 0 (the sender) and a
    generator worker on one device fail when the group opens, after the run has started."""
    from scalerl.placement import PlacementError, layout  # devices only: no model, no torch

    try:
        lay = layout(cfg, accelerator="cuda")
    except PlacementError:
        return  # check_layout (RunConfig's validator) reports it
    shared = [i for i, devices in enumerate(lay.generators) if lay.trainer[0] in devices]
    if shared:
        raise ValueError(
            f"weights.transport = 'nccl' with placement.colocate = true puts trainer rank 0 and "
            f"generator gen{shared[0]} on device {lay.trainer[0]}, and NCCL cannot put two ranks "
            "of its weight-transfer group on one device. Fix: weights.transport=local (one "
            "node), or give the generators devices of their own (placement.colocate=false)."
        )
