"""Prompt datasets: synthetic verifiable tasks or a user's Parquet / JSONL file, split train / eval.

    from scalerl.data import load_prompts
    prompts = load_prompts(cfg.data)        # PromptSet(train=[...], eval=[...])
    prompts.train[0]  # {"prompt_id": "...", "prompt": "...", "answer": "...", "task": "math"}

Every row carries the verifier's name in `task`, so scoring needs nothing but the row. The held-out
split is a seeded shuffle of the whole set; the same seed gives the same split. Bad files get one
`DataError` naming the file, the problem and the fix (missing columns, empty file, empty or
non-UTF-8 prompts, duplicate ids, fewer rows than the held-out split needs).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalerl.config import DataConfig


class DataError(ValueError):
    """A prompt dataset that cannot be used; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class PromptSet:
    train: list[dict[str, str]]
    eval: list[dict[str, str]]


SYNTHETIC_PREFIX = "synthetic:"


def _synthetic(cfg: DataConfig) -> list[dict[str, str]]:
    from functools import partial

    from scalerl.rewards.synthetic import make_arithmetic, make_countdown

    makers = {
        "arithmetic": make_arithmetic,
        # The range the tiny model's warm start covers (a+b, a-b with 1-2 digit operands): the
        # tiny-cpu demo's task, where a 2-core CPU run can show RL raising the pass rate.
        "arithmetic-easy": partial(make_arithmetic, digits=(1, 2), terms=(2, 2), ops="+-"),
        "countdown": make_countdown,
    }
    name = cfg.source.removeprefix(SYNTHETIC_PREFIX)
    if name not in makers:
        raise DataError(
            f"unknown synthetic source '{cfg.source}'. Fix: use one of "
            f"{', '.join(SYNTHETIC_PREFIX + k for k in makers)} or a .parquet/.jsonl file."
        )
    rows = makers[name](cfg.num_train_prompts + cfg.num_eval_prompts, seed=cfg.seed)
    return [{k: str(row[k]) for k in ("prompt_id", "prompt", "answer", "task")} for row in rows]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(
                    f"{path}: line {lineno} is not UTF-8. Fix: re-encode the file as UTF-8."
                ) from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg}). Fix: one JSON object per line."
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: line {lineno} is a {type(row).__name__}, not an object. Fix: one JSON object per line."
                )
            rows.append(row)
    return rows


def _read_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(
            f"dataset file {path} does not exist. Fix: pass an existing .parquet or .jsonl file, or a synthetic: source."
        )
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json", ".parquet"} and path.stat().st_size == 0:
        raise DataError(
            f"dataset file {path} has no rows (it is empty). Fix: point data.source at a file with prompts."
        )
    if suffix in {".jsonl", ".json"}:
        return _read_jsonl(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataError(
                f"{path} is not a readable Parquet file ({exc.__class__.__name__}). Fix: rewrite it with pyarrow or pandas."
            ) from None
    raise DataError(
        f"dataset file {path} has suffix '{suffix}'. Fix: use .parquet or .jsonl (one JSON object per line)."
    )


def _text(value: Any, path: Path, i: int, column: str) -> Any:
    """`value` as a str if it is UTF-8 text (bytes from a binary Parquet column are decoded)."""
    try:
        if isinstance(value, bytes):
            return value.decode("utf-8")
        if isinstance(value, str):
            value.encode("utf-8")  # lone surrogates ("\udcff" in JSON) are not UTF-8
    except UnicodeError:
        raise DataError(
            f"dataset file {path}: row {i} has a '{column}' that is not UTF-8 text. "
            "Fix: re-encode that row as UTF-8 (or drop it)."
        ) from None
    return value


def _from_file(cfg: DataConfig) -> list[dict[str, str]]:
    path = Path(cfg.source)
    rows = _read_file(path)
    if not rows:
        raise DataError(
            f"dataset file {path} has no rows. Fix: point data.source at a file with prompts."
        )
    columns = [cfg.prompt_column, cfg.answer_column] + ([cfg.id_column] if cfg.id_column else [])
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise DataError(
            f"dataset file {path} lacks column(s) {', '.join(missing)}; it has {', '.join(sorted(rows[0]))}. "
            "Fix: rename the columns or set data.prompt_column / data.answer_column / data.id_column."
        )
    task = "math" if cfg.task == "auto" else cfg.task
    out: list[dict[str, str]] = []
    for i, row in enumerate(rows):
        prompt = _text(row.get(cfg.prompt_column), path, i, cfg.prompt_column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(
                f"dataset file {path}: row {i} has an empty or non-text '{cfg.prompt_column}'. Fix: drop or fill that row."
            )
        answer = _text(row.get(cfg.answer_column), path, i, cfg.answer_column)
        if answer is None or str(answer).strip() == "":
            raise DataError(
                f"dataset file {path}: row {i} has no '{cfg.answer_column}'. Fix: every prompt needs a reference answer."
            )
        pid = (
            str(_text(row[cfg.id_column], path, i, cfg.id_column)) if cfg.id_column else f"p{i:07d}"
        )
        out.append({"prompt_id": pid, "prompt": prompt, "answer": str(answer), "task": task})
    seen: set[str] = set()
    dupes = sorted(
        {r["prompt_id"] for r in out if r["prompt_id"] in seen or seen.add(r["prompt_id"])}
    )
    if dupes:
        shown = ", ".join(dupes[:5]) + (" ..." if len(dupes) > 5 else "")
        raise DataError(
            f"dataset file {path}: duplicate prompt ids in '{cfg.id_column}': {shown}. Fix: make ids unique."
        )
    return out


def load_prompts(cfg: DataConfig) -> PromptSet:
    """All prompts of the run, split into train and held-out eval by a seeded shuffle."""
    rows = _synthetic(cfg) if cfg.source.startswith(SYNTHETIC_PREFIX) else _from_file(cfg)
    if cfg.task != "auto" and cfg.source.startswith(SYNTHETIC_PREFIX):
        rows = [{**r, "task": cfg.task} for r in rows]
    if len(rows) <= cfg.num_eval_prompts:
        raise DataError(
            f"{cfg.source} has {len(rows)} prompts, not more than data.num_eval_prompts = {cfg.num_eval_prompts}. "
            "Fix: lower data.num_eval_prompts or add prompts."
        )
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[: cfg.num_eval_prompts])
    train = [rows[i] for i in range(len(rows)) if i not in held]
    if cfg.source.startswith(SYNTHETIC_PREFIX):
        train = train[: cfg.num_train_prompts]
    return PromptSet(train=train, eval=[rows[i] for i in sorted(held)])
