"""`scalerl runs export-model RUN [--version V] -o DIR`: a weights version of a run as a Hugging
Face model folder (runtime/export_model.py): the version's files, each checked against its
manifest's sha256, a model card (run, version, base model, recipe, evaluation) and
scalerl_export.json. Read-only on the run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import EndpointOpt, RunArg, StorageOpt, _guard, _open_run


def runs_export_model(
    run_id: RunArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write (new or empty).")],
    version: Annotated[
        int | None,
        typer.Option("--version", help="Weights version (default: the newest)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty --output folder.")
    ] = False,
    adapter_only: Annotated[
        bool,
        typer.Option(
            "--adapter-only",
            help="A LoRA run's adapter alone (peft format), not merged into the base model.",
        ),
    ] = False,
    storage: StorageOpt = "./runs",
    endpoint_url: EndpointOpt = None,
) -> None:
    """Export a weights version as a Hugging Face model folder that
    AutoModelForCausalLM.from_pretrained loads: the model, its config and tokenizer as
    published, a model card and scalerl_export.json. A LoRA run's version is merged into its
    base model (or, with --adapter-only, exported as the adapter). A damaged version is
    refused."""
    from runtime.export_model import export_model

    with _guard():
        run = _open_run(storage, endpoint_url, run_id)
        out = export_model(run, version, output, overwrite=overwrite, adapter_only=adapter_only)
    typer.echo(
        f"exported run {run_id} weights version {out['version']} to {out['dir']} "
        f"({out['files']} files, {out['bytes']:,} bytes)"
    )
