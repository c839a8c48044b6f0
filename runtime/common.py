"""What every task needs: the run's store from the config, run ids, the policy's local files.

Credentials never pass through here: s3fs reads them from the usual AWS_* variables; only the
endpoint (not secret) comes from the config.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

from scalerl.config import RunConfig
from storage import Run, open_store

BUILTIN_TINY = "builtin:tiny"
BUILTIN_TINY_WARM = "builtin:tiny-warm"


def storage_options(config: RunConfig) -> dict | None:
    endpoint = config.storage.endpoint_url
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else None


def open_run(config: RunConfig, run_id: str, *, create: bool = False) -> Run:
    return open_store(config.storage.url, storage_options=storage_options(config)).run(
        run_id, create=create
    )


def with_run_id(config: RunConfig, run_id: str) -> RunConfig:
    """`config` with storage.run_id set: the snapshot a run keeps in run.json names its own id."""
    if config.storage.run_id == run_id:
        return config
    return config.model_copy(
        update={"storage": config.storage.model_copy(update={"run_id": run_id})}
    )


@functools.cache
def _detected_accelerator() -> str:
    from scalerl.placement import detect_accelerator

    return detect_accelerator()


def accelerator(config: RunConfig) -> str:
    """'cuda' or 'cpu' for this run on this machine (placement.accelerator; auto asks once)."""
    acc = config.placement.accelerator
    return _detected_accelerator() if acc == "auto" else acc


def process_env(config: RunConfig, name: str) -> dict[str, str]:
    """The environment a process of the run starts with: its CUDA_VISIBLE_DEVICES from the
    placement plan (scalerl/placement.py) on cuda; nothing on cpu, nor for a process the plan
    does not name (an extra generator added from another machine places itself). A process
    planned on another node cannot be started from this one: PlacementError says so.

    The plan's local indices are composed with this process's own CUDA_VISIBLE_DEVICES when it
    has one (SLURM, Kubernetes, `CUDA_VISIBLE_DEVICES=4,5 scalerl run`): local device i is that
    list's i-th entry, so children stay on the devices the run was given. Called in the flow
    process, which starts every child (a child's own list is already its share)."""
    acc = accelerator(config)
    if acc == "cpu":
        return {}
    from scalerl.placement import PlacementError, make_plan, parent_devices

    plan = make_plan(config, accelerator=acc, visible=parent_devices())
    found = [p for p in plan.processes if p.name == name]
    if not found:
        return {}
    if found[0].node != 0:
        raise PlacementError(
            f"{name} is placed on node {found[0].node}, and this flow starts processes on node 0 "
            "only. Fix: start it on its node (a generator: the scalerl-generate deployment), or "
            "place it on node 0."
        )
    return dict(found[0].env)


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (getrusage; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_placement(config: RunConfig) -> None:
    """On cuda, before anything is written: every process on node 0 (the only one this flow
    starts processes on) and the placement plan with the model's memory (scalerl/placement.py),
    so a share that cannot hold the weights or a KV cache below one sequence fails with one
    line instead of in a generator after the run started. Nothing on cpu. A hub model whose
    config cannot be read here is left to the engines' own checks. First of all, what the
    weight transport needs of this machine (nccl: a CUDA device); then the devices this
    machine shows against placement.devices_per_node (scalerl/placement.py check_inventory)."""
    from runtime.transports import transport_for

    acc = accelerator(config)
    transport_for(config).check(acc)
    if acc == "cpu":
        return
    from scalerl.models import ModelLoadError
    from scalerl.placement import PlacementError, check_inventory, make_plan, model_shape

    check_inventory(config)  # a child given a device that is not there fails only inside

    pl = config.placement

    def started_here(name: str) -> bool:  # roles on a deployment run wherever its pool puts them
        if name.startswith("trainer"):
            return pl.trainer_deployment is None
        if name.startswith("gen"):
            return pl.generators_deployment is None
        return True

    elsewhere = [
        p
        for p in make_plan(config, accelerator="cuda").processes
        if p.node != 0 and started_here(p.name)
    ]
    if elsewhere:  # process_env would refuse them only once the run has started
        raise PlacementError(
            f"{elsewhere[0].name} is placed on node {elsewhere[0].node}, and this flow starts "
            "processes on node 0 only. Fix: place every process on node 0 (fewer generators "
            "or trainer ranks, or placement.nodes=1)."
        )
    try:
        shape = model_shape(config.model.name_or_path, config.model.revision)
    except ModelLoadError:
        return
    make_plan(config, shape, accelerator="cuda")


def new_run_id() -> str:
    """Sortable and unique: 20261125-153012-a1b2."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def materialize_base_model(config: RunConfig, out_dir: Path) -> Path:
    """Write the base policy (weights version 0) as a local directory of safetensors + config +
    tokenizer: the locally built tiny model for `builtin:tiny`, the tiny model warm-started on the
    synthetic task for `builtin:tiny-warm` (scalerl/warmstart.py; its training prompts skip the
    run's held-out prompts), else whatever from_pretrained loads from the hub id or local path."""
    if config.model.name_or_path == BUILTIN_TINY_WARM:
        return _warm_tiny_model(config, out_dir)  # a cached copy: no torch in the flow process
    from scalerl.models import build_tiny_model, load_policy

    if config.model.name_or_path == BUILTIN_TINY:
        return build_tiny_model(out_dir, seed=config.data.seed)
    model, tokenizer = load_policy(
        config.model.name_or_path, dtype=config.model.dtype, revision=config.model.revision
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def check_lora(config: RunConfig) -> None:
    """model.lora against the model, before anything is written (LoraError, one line): its
    target modules exist in the architecture (built on the meta device), and with a vLLM engine
    vLLM can serve LoRA for it. The built-in models are checked on their own config, a hub id on
    its snapshot at model.revision in the local cache; one not cached here is checked by
    prepare_run, when the run loads it."""
    if config.model.lora is None:
        return
    name = config.model.name_or_path
    with tempfile.TemporaryDirectory(prefix="scalerl-lora-check-") as tmp:
        if name == BUILTIN_TINY:
            from scalerl.models import build_tiny_model

            model_dir = build_tiny_model(Path(tmp) / "m", seed=config.data.seed)
        elif name == BUILTIN_TINY_WARM:
            from scalerl.warmstart import SHIPPED_DIR

            model_dir = SHIPPED_DIR
        elif Path(name).expanduser().is_dir():
            model_dir = Path(name).expanduser()
        else:
            try:  # a hub id: its snapshot at model.revision in the local cache, never the network
                from huggingface_hub import snapshot_download

                from scalerl.placement import hub_cache_dir

                model_dir = Path(
                    snapshot_download(
                        name,
                        revision=config.model.revision,
                        cache_dir=hub_cache_dir(),
                        local_files_only=True,
                    )
                )
            except Exception:  # noqa: BLE001 - not cached here: prepare_run checks it
                return
            if not (model_dir / "config.json").is_file():
                return
        check_lora_model(config, model_dir, name)


def check_lora_model(config: RunConfig, model_dir, name: str) -> None:
    """model.lora against the model at `model_dir` (`name`: as the config names it): with a
    vLLM engine vLLM serves LoRA for its architecture, and the adapters' target modules (and
    trained modules) are in it (LoraError, one line)."""
    from scalerl import lora

    if config.generation.engine != "transformers":
        from scalerl.engines.vllm_common import check_lora_support

        check_lora_support(str(model_dir))
    lora.check_targets(model_dir, config.model.lora, name)


class WarmSource(NamedTuple):
    shipped: Path | None
    """The shipped copy's directory when it fits the run, else None."""
    cached: Path
    """The local cache directory for the run's inputs (used when shipped is None)."""
    seed: int
    spec: object
    """scalerl.warmstart.WarmStartSpec."""
    overlap: list[str]
    """The run's held-out prompts that the warm start must not train on."""


def tiny_warm_source(config: RunConfig) -> WarmSource:
    """Where this run's builtin:tiny-warm comes from.

    The shipped copy (scalerl/assets/tiny-warm, checked against its manifest's hashes here) when
    it was built for the run's seed and held-out prompts, else the local cache, keyed by the
    inputs (seed, recipe, and the held-out prompts the warm start must not train on). Raises
    ValueError for data the warm model was not trained for, ShippedWeightsError for shipped
    files that do not match their hashes; prepare calls it before the run writes anything."""
    import hashlib
    import json
    from dataclasses import asdict

    from scalerl.data import load_prompts
    from scalerl.warmstart import WarmStartSpec, shipped_for, training_rows  # no torch

    if config.data.task != "arithmetic" and not config.data.source.startswith(
        "synthetic:arithmetic"
    ):
        raise ValueError(
            f"model.name_or_path = {BUILTIN_TINY_WARM!r} is warm-started on arithmetic, but "
            f"data.source = {config.data.source!r} with data.task = {config.data.task!r}. Fix: use "
            f"synthetic:arithmetic or a file with data.task=arithmetic, or {BUILTIN_TINY!r}."
        )
    spec, seed = WarmStartSpec(), config.data.seed
    # Only held-out prompts that the warm start would train on change its weights, so the cache
    # key holds just those: runs whose held-out sets miss its training set share one model.
    trained_on = {r["prompt"] for r in training_rows(seed=seed, spec=spec)}
    overlap = sorted(trained_on & {r["prompt"] for r in load_prompts(config.data).eval})
    key = hashlib.sha256(json.dumps([seed, asdict(spec), overlap]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("SCALERL_CACHE") or Path.home() / ".cache" / "scalerl")
    shipped = shipped_for(seed, spec, overlap)
    return WarmSource(shipped, root / f"tiny-warm-{key}", seed, spec, overlap)


def _warm_tiny_model(config: RunConfig, out_dir: Path) -> Path:
    """The warm-started tiny model: the shipped copy when it fits the run (scalerl/warmstart.py),
    else built once and cached on local disk by its inputs (it is deterministic, and minutes of
    CPU per run add up over tests and comparisons). Cache root: $SCALERL_CACHE, else
    ~/.cache/scalerl. No torch in this process unless it has to train one."""
    from scalerl.warmstart import read_manifest

    source = tiny_warm_source(config)
    if source.shipped is not None:
        _warm_logger().info("%s: the shipped weights (%s)", BUILTIN_TINY_WARM, source.shipped)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in read_manifest(source.shipped)["files"]:  # the hash-checked files only
            shutil.copyfile(source.shipped / name, out_dir / name)
        return out_dir
    cached = source.cached
    if not (cached / "config.json").is_file():
        from scalerl.warmstart import warm_start_tiny  # imports torch

        tmp = cached.parent / f".{cached.name}-{secrets.token_hex(4)}"
        warm_start_tiny(
            tmp,
            seed=source.seed,
            spec=source.spec,
            exclude=source.overlap,
            log=_warm_progress(source.spec, cached),
        )
        try:
            tmp.rename(cached)  # atomic: a concurrent builder's identical copy may win
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cached, out_dir, dirs_exist_ok=True)
    return out_dir


def _warm_logger():
    from runtime.logs import task_logger

    return task_logger("scalerl.warmstart")


def _warm_progress(spec, cached: Path):
    """A `log(step, loss)` for warm_start_tiny that says how far the one-off warm start is, with
    an estimate of the time left (it takes minutes on 2 cores and the run waits for it)."""
    import time

    logger = _warm_logger()
    start = time.monotonic()
    logger.info(
        "building %s once: %d supervised steps on arithmetic (a few minutes on 2 cores; "
        "this run's seed or held-out prompts differ from the shipped copy's; cached at %s for "
        "later runs)",
        BUILTIN_TINY_WARM,
        spec.steps,
        cached,
    )

    def log(step: int, loss: float) -> None:
        done = step + 1
        elapsed = time.monotonic() - start
        left = elapsed / done * (spec.steps - done)
        logger.info(
            "warm start: step %d/%d (%.0f%%), loss %.3f, %.0f s elapsed, about %.0f s left",
            done,
            spec.steps,
            100.0 * done / spec.steps,
            loss,
            elapsed,
            left,
        )

    return log


class WeightCache:
    """Local copies of published weight versions (engines and trainers load from disk)."""

    def __init__(self, run: Run, root: Path | None = None, config: RunConfig | None = None) -> None:
        """config: the run's; a version its weight transport keeps on this machine (transport
        local: the node-local directory) is read there in place, the others downloaded."""
        self.run = run
        self.root = Path(root or tempfile.mkdtemp(prefix=f"scalerl-{run.run_id}-w-"))
        self.transport = None
        if config is not None:
            from runtime.transports import transport_for

            self.transport = transport_for(config)

    def path(self, version: int) -> Path:
        if self.transport is not None:
            in_place = self.transport.local_path(self.run, version)
            if in_place is not None:
                return in_place
        local = self.root / f"v{version}"
        from scalerl.lora import version_complete  # a model, or a LoRA run's adapter

        if not version_complete(local):
            self.run.download_weights(version, local)
        return local

    def keep_only(self, version: int) -> None:
        """Delete the local copies of every other version (with a real policy a copy is
        gigabytes, and a generator sees a new version after every trainer step)."""
        for old in self.root.glob("v*"):
            if old.name != f"v{version}":
                shutil.rmtree(old, ignore_errors=True)


def adopt_lease(writer_lease: str | None) -> None:
    """Write under the run flow's lease from here on (a role it started on another machine):
    this process and its children check it before every commit (storage/lease.py)."""
    if writer_lease:
        from storage import lease as leases

        os.environ[leases.ENV] = writer_lease


def config_of_run(storage_url: str, run_id: str, endpoint_url: str | None = None) -> RunConfig:
    """A run's config snapshot (run.json), pointed at the storage URL it is read from now, so a
    run that was moved or is mounted elsewhere keeps working."""
    from scalerl.config import upgrade_snapshot, validate_config

    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None
    saved = upgrade_snapshot(
        open_store(storage_url, storage_options=options).run(run_id).read_config()
    )
    saved["storage"] = {
        **saved.get("storage", {}),
        "url": storage_url,
        "endpoint_url": endpoint_url,
        "run_id": run_id,
    }
    return validate_config(saved)


def resume_config(
    run_id: str, storage_url: str, endpoint_url: str | None = None
) -> tuple[RunConfig, dict]:
    """(config, status) to resume run `run_id` with: its own run.json snapshot, which the run
    accepts as the same run. When the run is read from another place than the one it was started
    at (moved, or another mount or endpoint), run.json's storage section is rewritten to point
    there; a snapshot written by an earlier version of the config's schema (e.g. the weights
    section before each transport had its own fields) is rewritten in its current form, the
    same values. Nothing else in the snapshot ever changes. An unknown run id raises
    RunNotFoundError."""
    from scalerl.config import upgrade_snapshot, validate_config

    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None
    run = open_store(storage_url, storage_options=options).run(run_id)
    saved, status = run.read_config(), run.read_status() or {}
    upgraded = upgrade_snapshot(saved)
    where = {**(saved.get("storage") or {}), "run_id": run_id}
    if status.get("state") == "finished":  # a finished run is left as it is
        return validate_config({**upgraded, "storage": where}), status
    if where.get("url") != storage_url or where.get("endpoint_url") != endpoint_url:
        where = {**where, "url": storage_url, "endpoint_url": endpoint_url}
    config = validate_config({**upgraded, "storage": where})
    if config.model_dump(mode="json") != saved:  # moved, or an earlier schema's snapshot
        run.write_config(config.model_dump(mode="json"), overwrite=True)
    return config, status
