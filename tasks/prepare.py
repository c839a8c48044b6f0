"""prepare_run: the run directory, its config snapshot, prompts, weights v0 and curriculum v0.

Idempotent: on a resumed run every step finds its committed output and changes nothing (an
identical config/prompt rewrite is a no-op in the store; a different one is refused).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
from prefect import get_run_logger, task

from runtime.common import (
    BUILTIN_TINY_WARM,
    check_placement,
    materialize_base_model,
    new_run_id,
    open_run,
    tiny_warm_source,
)
from scalerl.config import RunConfig


def retry_unless_bad_input(_task, _task_run, state) -> bool:
    """Retry what may pass next time (storage, network); never bad input (a ValueError: data,
    model, run id, storage URL), which would fail the same way after a pointless wait."""
    try:
        state.result()
    except ValueError:
        return False
    except BaseException:  # noqa: BLE001 - any other failure may be transient
        return True
    return True


@task(
    name="prepare-run",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
    timeout_seconds=3600,
)
def prepare_run(config: RunConfig, run_id: str | None = None) -> str:
    from runtime.prompts import prepare_prompts

    # Inputs first: a run started from the Prefect UI skips the CLI's checks, and a bad data
    # file or model must fail here with one line, before a run directory exists.
    if config.model.name_or_path == BUILTIN_TINY_WARM:
        tiny_warm_source(config)  # shipped weights that fail their hash check: before any write
    # the model (a local directory: config, weights, tokenizer), then the prompts rendered with
    # its chat template and length-checked (runtime/prompts.py)
    prompts = prepare_prompts(config)
    check_placement(config)  # on cuda: the memory of the plan (a PlacementError, a ValueError)
    with tempfile.TemporaryDirectory(prefix="scalerl-v0-") as tmp:
        lora_base = None
        if config.model.lora is not None:  # adapters that fit the model: before any write
            if _has_version_zero(config, run_id or config.storage.run_id):
                from runtime.common import check_lora  # a resume: the checks, no new base

                check_lora(config)
            else:
                lora_base = lora_version_zero(config, Path(tmp) / "v0")
        return _prepare(config, run_id, prompts, lora_base)


def _has_version_zero(config: RunConfig, run_id: str | None) -> bool:
    from storage.errors import RunNotFoundError

    if run_id is None:
        return False
    try:
        return open_run(config, run_id).has_weights(0)
    except RunNotFoundError:
        return False


def lora_version_zero(config: RunConfig, out_dir: Path) -> Path:
    """Version 0 of a LoRA run: the base model with the initial adapter beside it
    (scalerl/lora.py), drawn from trainer.seed. Raises LoraError (a ValueError: not retried) when
    the adapters do not fit the model or vLLM cannot serve LoRA for it."""
    from runtime.common import check_lora_model
    from scalerl import lora

    base = materialize_base_model(config, out_dir)
    check_lora_model(config, base, config.model.name_or_path)
    tensors = lora.initial_adapter(base, config.model.lora, config.trainer.seed)
    lora.save_adapter(base / lora.ADAPTER_DIR, tensors, config.model.lora)
    return base


def _prepare(config: RunConfig, run_id: str | None, prompts, lora_base: Path | None) -> str:
    """Everything prepare_run writes, once the inputs are checked."""
    from scalerl.curriculum import NoPositiveResampling
    from storage import PROMPT_SCHEMA

    logger = get_run_logger()
    run_id = run_id or config.storage.run_id or new_run_id()
    run = open_run(config, run_id, create=True)
    run.write_config(config.model_dump(mode="json"))
    for split, rows in prompts.splits.items():
        run.write_prompts(split, prompt_table(rows, PROMPT_SCHEMA))
    if prompts.dropped or prompts.template != "none":
        run.append_metrics("prompts", prompts.summary(config.generation.max_prompt_tokens))
    if run.latest_weights_version() is None:
        from runtime.transports import transport_for
        from runtime.transports.publisher import record_version

        with tempfile.TemporaryDirectory(prefix="scalerl-v0-") as tmp:
            base = lora_base or materialize_base_model(config, Path(tmp) / "v0")
            size = sum(f.stat().st_size for f in Path(base).rglob("*") if f.is_file())
            record_version(run, 0, transport_for(config).name, True, size)
            run.publish_weights(0, base)
    if run.load_curriculum() is None:
        sampler = NoPositiveResampling(
            [r["prompt_id"] for r in prompts.train],
            pass_rate_threshold=config.algorithm.pass_rate_threshold,
            seed=config.data.seed,
        )
        run.save_curriculum({"sampler": sampler.state_dict(), "applied": []}, 0)
    status = run.read_status() or {}
    if status.get("state") != "running":
        run.write_status({"state": "running", "reason": "prepared"})
    logger.info(
        "run %s at %s: %s prompts (chat template: %s)",
        run_id,
        run.url,
        ", ".join(f"{len(rows)} {split}" for split, rows in prompts.splits.items()),
        prompts.template,
    )
    return run_id


def prompt_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """A prompt split as a table: PROMPT_SCHEMA's columns, plus raw_prompt (the unrendered prompt
    or chat) when a chat template rendered the prompts. Raw prompts keep today's exact table, so
    a run prepared before templates existed resumes with identical splits."""
    table = pa.Table.from_pylist(rows, schema=schema)
    if rows and "raw_prompt" in rows[0]:
        table = table.append_column(
            pa.field("raw_prompt", pa.string()),
            pa.array([r["raw_prompt"] for r in rows], pa.string()),
        )
    return table
