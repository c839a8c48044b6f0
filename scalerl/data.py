"""Prompt datasets: synthetic verifiable tasks or a user's Parquet / JSONL file, split train / eval.

    from scalerl.data import load_prompts
    prompts = load_prompts(cfg.data)        # PromptSet(train=[...], eval=[...])
    prompts.train[0]  # {"prompt_id": "...", "prompt": "...", "answer": "...", "task": "math"}

Every row carries the verifier's name in `task`, so scoring needs nothing but the row. The held-out
split is a seeded shuffle of the whole set; the same seed gives the same split. Bad files get one
`DataError` naming the file, the problem and the fix (missing columns, empty file, empty or
non-UTF-8 prompts, null or duplicate ids, answers that no completion can match: a NUL byte, an
unclosed `\\boxed{`, a non-integer answer for data.task=arithmetic; fewer rows than the held-out
split needs).

Answers are stored as text. A file's numeric answer cells are converted to the canonical string
(docs/ROLLOUT_SCHEMA.md, "Dataset files"): an int -> its digits; a float with an integral value
-> that integer (pandas writes an int column holding a null as floats: 142.0 -> "142"); another
float -> its shortest repr ("0.5"); NaN -> missing. With data.task=arithmetic every answer must
be an integer (text "142.0" also becomes "142"; 142.5 is refused).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from decimal import Decimal
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


def _is_null(value: Any) -> bool:
    """None, or a float NaN (what pandas writes for a missing value in a numeric column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _answer_text(value: Any, where: str, column: str) -> str:
    """A file's answer cell as the canonical answer string (docs/ROLLOUT_SCHEMA.md, "Dataset
    files"): text as is; an int as its decimal digits; a float or decimal with an integral value
    as that integer (142.0 -> "142"); another finite float as its shortest repr (0.5 -> "0.5");
    a JSON object or list (a Parquet struct / list) as JSON text. Booleans, infinities and other
    types are refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise DataError(
            f"{where} has a boolean '{column}' ({value}). Fix: write the reference answer as "
            "text or a number."
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        if not math.isfinite(value):
            raise DataError(
                f"{where} has '{column}' = {value}, not a finite number. Fix: give the reference "
                "answer (or drop the row)."
            )
        if value == int(value):
            return str(int(value))
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, dict | list):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
    raise DataError(
        f"{where} has a '{column}' of type {type(value).__name__}. Fix: write the reference "
        "answer as text or a number."
    )


def _from_file(cfg: DataConfig) -> list[dict[str, str]]:
    from scalerl.rewards.base import has_unclosed_box
    from scalerl.rewards.synthetic import arithmetic_reference

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
    col = cfg.answer_column
    out: list[dict[str, str]] = []
    for i, row in enumerate(rows):
        prompt = _text(row.get(cfg.prompt_column), path, i, cfg.prompt_column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(
                f"dataset file {path}: row {i} has an empty or non-text '{cfg.prompt_column}'. Fix: drop or fill that row."
            )
        if cfg.id_column:
            raw_id = _text(row.get(cfg.id_column), path, i, cfg.id_column)
            if _is_null(raw_id) or str(raw_id).strip() == "":
                raise DataError(
                    f"dataset file {path}: prompt id is empty or null in row {i} (column "
                    f"'{cfg.id_column}'). Fix: give every row a unique, non-empty id in "
                    f"'{cfg.id_column}', or unset data.id_column to number the rows instead."
                )
            pid = str(raw_id)
        else:
            pid = f"p{i:07d}"
        where = f"dataset file {path}: row {i} (prompt id {pid!r})"
        value = _text(row.get(col), path, i, col)
        if _is_null(value) or (isinstance(value, str) and value.strip() == ""):
            raise DataError(
                f"dataset file {path}: row {i} has no '{col}'. Fix: every prompt needs a reference answer."
            )
        answer = _answer_text(value, where, col)
        if "\x00" in answer:
            raise DataError(
                f"{where} has a NUL byte (\\x00) in '{col}', which no completion can match. "
                "Fix: remove the NUL characters from that answer (or drop the row)."
            )
        if has_unclosed_box(answer):
            raise DataError(
                f"{where} has an unclosed \\boxed{{ in '{col}' (a '{{' without its '}}'), which "
                "no completion can match. Fix: close the braces or give the bare answer "
                "(e.g. 42 rather than \\boxed{42})."
            )
        if task == "arithmetic":
            try:
                answer = str(arithmetic_reference(answer))
            except ValueError:
                raise DataError(
                    f"{where} has '{col}' = {answer[:40]!r}, not an integer, but data.task = "
                    "arithmetic checks exact integers. Fix: give the integer answer, or set "
                    "data.task=math to compare answers with math-verify."
                ) from None
        out.append({"prompt_id": pid, "prompt": prompt, "answer": answer, "task": task})
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
