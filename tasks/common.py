"""What every task needs: the run's store from the config, run ids, the policy's local files.

Credentials never pass through here: s3fs reads them from the usual AWS_* variables; only the
endpoint (not secret) comes from the config.
"""

from __future__ import annotations

import datetime as dt
import secrets
import shutil
import tempfile
from pathlib import Path

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


def _warm_tiny_model(config: RunConfig, out_dir: Path) -> Path:
    """The warm-started tiny model, cached on local disk by its inputs (seed, recipe, and the
    held-out prompts it must not train on): it is deterministic, and a minute of CPU per run adds up over tests and
    comparisons. Cache root: $SCALERL_CACHE, else ~/.cache/scalerl."""
    import hashlib
    import json
    import os
    import shutil
    from dataclasses import asdict

    from scalerl.data import load_prompts
    from scalerl.warmstart import WarmStartSpec, training_rows, warm_start_tiny  # lazy torch

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
    cached = root / f"tiny-warm-{key}"
    if not (cached / "config.json").is_file():
        tmp = root / f".tiny-warm-{key}-{secrets.token_hex(4)}"
        warm_start_tiny(tmp, seed=seed, spec=spec, exclude=overlap)
        try:
            tmp.rename(cached)  # atomic: a concurrent builder's identical copy may win
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cached, out_dir, dirs_exist_ok=True)
    return out_dir


class WeightCache:
    """Local copies of published weight versions (engines and trainers load from disk)."""

    def __init__(self, run: Run, root: Path | None = None) -> None:
        self.run = run
        self.root = Path(root or tempfile.mkdtemp(prefix=f"scalerl-{run.run_id}-w-"))

    def path(self, version: int) -> Path:
        local = self.root / f"v{version}"
        if not (local / "config.json").exists():
            self.run.download_weights(version, local)
        return local

    def keep_only(self, version: int) -> None:
        """Delete the local copies of every other version (with a real policy a copy is
        gigabytes, and a generator sees a new version after every trainer step)."""
        for old in self.root.glob("v*"):
            if old.name != f"v{version}":
                shutil.rmtree(old, ignore_errors=True)


def config_of_run(storage_url: str, run_id: str, endpoint_url: str | None = None) -> RunConfig:
    """A run's config snapshot (run.json), pointed at the storage URL it is read from now, so a
    run that was moved or is mounted elsewhere keeps working."""
    from scalerl.config import validate_config

    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None
    saved = open_store(storage_url, storage_options=options).run(run_id).read_config()
    saved["storage"] = {
        **saved.get("storage", {}),
        "url": storage_url,
        "endpoint_url": endpoint_url,
        "run_id": run_id,
    }
    return validate_config(saved)
