"""Render docs/CONFIG.md from the RunConfig schema (`scalerl config docs -o docs/CONFIG.md`).

The document is generated, never edited by hand; tests/scalerl/test_config.py fails when it is stale.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from scalerl.config import (
    _LOSS_TYPES,
    _TRANSPORTS,
    PRESETS,
    AlgorithmConfig,
    EvalSetConfig,
    EvaluationConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    TrackingConfig,
)

_BOUNDS = (
    ("ge", ">="),
    ("gt", ">"),
    ("le", "<="),
    ("lt", "<"),
    ("min_length", "len >="),
    ("pattern", "matches"),
)


def _bounds(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sym in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} `{value}`" if attr == "pattern" else f"{sym} {value}")
    return ", ".join(parts)


def _type_name(info: FieldInfo) -> str:
    text = str(info.annotation).replace("typing.", "")
    for prefix in ("<class '",):
        text = text.replace(prefix, "").replace("'>", "")
    return text.replace("|", "\\|")


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        value: Any = info.default_factory()
        return "see below" if isinstance(value, BaseModel) else repr(value)
    return repr(info.default)


def _cell(default: str) -> str:
    return default if default == "required" else f"`{default}`"


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        rows.append(
            f"| `{prefix}{name}` | {_type_name(info)} | {_cell(_default(info))} | {_bounds(info)} | {info.description or ''} |"
        )
    return rows


def _variants(variants: dict[str, type[BaseModel]], prefix: str, tag: str) -> list[str]:
    """One table per variant of a discriminated union (the loss, the weights)."""
    out = []
    for name, model in variants.items():
        out += [f"### `{prefix}.{tag}: {name}`", ""]
        out += _table(model, f"{prefix}.")
        out.append("")
    return out


def _optional_model(info: FieldInfo) -> type[BaseModel]:
    """The model of a `Model | None` field (a tracking sink)."""
    return next(
        t
        for t in typing.get_args(info.annotation)
        if isinstance(t, type) and issubclass(t, BaseModel)
    )


def render_config_markdown() -> str:
    out = [
        "# Run configuration reference",
        "",
        "Generated from `scalerl.config.RunConfig` by `scalerl config docs -o docs/CONFIG.md`; do not edit",
        "by hand. Defaults are the paper's (ScaleRL, Khatri et al. 2025). Load a YAML file with the same",
        "sections, start from a preset (`--preset`), and override single fields with",
        "`--set section.field=value`. Unknown keys are rejected with the closest valid name.",
        "",
        f"Presets: {', '.join(f'`{name}`' for name in PRESETS)}.",
        "",
    ]
    for section, info in RunConfig.model_fields.items():
        model = info.annotation
        out += [f"## `{section}`", "", info.description or "", ""]
        if model is AlgorithmConfig:
            out += _table(model, f"{section}.")
            out += ["", "`algorithm.loss` is chosen by its `type`:", ""]
            out += _variants(_LOSS_TYPES, "algorithm.loss", "type")
        elif section == "weights":
            out += ["`weights` is chosen by its `transport`; each one has its own fields:", ""]
            out += _variants(_TRANSPORTS, "weights", "transport")
        else:
            out += _table(model, f"{section}.")
            out.append("")
        if model is ModelConfig:
            out += ["### `model.lora`", "", " ".join((LoraConfig.__doc__ or "").split()), ""]
            out += _table(LoraConfig, "model.lora.")
            out.append("")
        if model is EvaluationConfig:
            out += ["Each entry of `evaluation.sets`:", ""]
            out += _table(EvalSetConfig, "evaluation.sets[].")
            out.append("")
        if model is TrackingConfig:
            for name, sink in TrackingConfig.model_fields.items():
                out += [f"### `{section}.{name}`", ""]
                out += _table(_optional_model(sink), f"{section}.{name}.")
                out.append("")
    for name, overrides in PRESETS.items():
        out += [f"## Preset `{name}`", ""]
        if not overrides:
            out += ["The defaults above, unchanged.", ""]
            continue
        for section, fields in overrides.items():
            for field, value in fields.items():
                out.append(f"- `{section}.{field}` = `{value!r}`")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
