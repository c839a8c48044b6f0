"""Prompt datasets: synthetic verifiable tasks, a user's Parquet / JSONL file, a Hugging Face
dataset (`hf:OWNER/NAME`) or a local `datasets` folder; split train / eval; evaluation sets.

    from scalerl.data import load_eval_set, load_prompts
    prompts = load_prompts(cfg.data)        # PromptSet(train=[...], eval=[...])
    prompts.train[0]  # {"prompt_id": "...", "prompt": "...", "answer": "...", "task": "math"}
    aime = load_eval_set(cfg.evaluation.sets[0], cfg.data)   # rows of one named set

Every row carries the verifier's name in `task`, so scoring needs nothing but the row. The held-out
split is a seeded shuffle of the whole set; the same seed gives the same split (none when
data.num_eval_prompts = 0). Bad data gets one `DataError` naming the source, the problem and the
fix (missing columns, empty file, empty or non-UTF-8 prompts, null or duplicate ids, answers that
no completion can match: a NUL byte, an unclosed `\\boxed{`, a non-integer answer for
data.task=arithmetic; fewer rows than the held-out split needs; a malformed chat).

Sources (data.source, or an evaluation set's source):
- `synthetic:NAME`: generated prompts (training data only).
- a `.parquet` / `.jsonl` file, read in record batches (Parquet) or line by line (JSONL).
- `hf:OWNER/NAME`: `datasets`' loader with data.subset / data.split / data.revision. Offline
  (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set when the call is made) or when the Hub cannot be
  reached, it is read from the local cache: first the hub cache snapshot that `hf download
  OWNER/NAME --repo-type dataset` (or an earlier online load) leaves in
  $HF_HOME/hub/datasets--OWNER--NAME, then the prepared Arrow cache an earlier `load_dataset`
  left in $HF_HOME/datasets (datasets' own offline fallback; not with data.revision, which that
  cache does not record). Neither: one line saying where it looked and what to run.
- a folder: one written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (a DatasetDict
  takes data.split), or a folder of data files in the Hub's layout (`hf download --local-dir`).
Arrow-backed sources are memory-mapped and read one record batch at a time: only the output
rows are built in the flow process, never a second full copy of the table.

Columns: prompt_column / answer_column / id_column may be a dotted path into a struct column
("reward_model.ground_truth"). With messages_column the prompt is a chat, a list of {role,
content} turns (roles system / user / assistant, non-empty text content, at least one user turn,
not ending with an assistant turn); rows then also carry `messages` (the chat as JSON text,
turns reduced to role and content) and `prompt` is the last user turn's content (shown in
reports, compared by the warm-start overlap checks). Without messages_column rows carry no
`messages` key.

Answers are stored as text. A file's numeric answer cells are converted to the canonical string
(docs/ROLLOUT_SCHEMA.md, "Dataset files"): an int -> its digits; a float with an integral value
-> that integer (pandas writes an int column holding a null as floats: 142.0 -> "142"); another
float -> its shortest repr ("0.5"); NaN -> missing. With data.task=arithmetic every answer must
be an integer (text "142.0" also becomes "142"; 142.5 is refused).
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from scalerl.config import DataConfig, EvalSetConfig


class DataError(ValueError):
    """A prompt dataset that cannot be used; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class PromptSet:
    train: list[dict[str, str]]
    eval: list[dict[str, str]]


SYNTHETIC_PREFIX = "synthetic:"
HF_PREFIX = "hf:"
CHAT_ROLES = ("system", "user", "assistant")
_BATCH_ROWS = 1024  # rows turned into Python objects at a time from an Arrow source
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class _Spec:
    """Where one table of prompts comes from and how its columns are read; `field` is the config
    prefix the fixes name ('data' or "evaluation.sets['aime']")."""

    source: str
    subset: str | None
    split: str
    revision: str | None
    prompt_column: str
    answer_column: str
    id_column: str | None
    messages_column: str | None
    task: str
    field: str = "data"
    limit: int | None = None
    prefix: str = ""  # put before every message (names the evaluation set)


@dataclass
class _Table:
    """An opened source: the label its messages start with, the column paths it has (struct
    fields as 'column.field') and its rows, read lazily."""

    label: str
    columns: set[str]
    rows: Iterator[dict[str, Any]]


# ------------------------------------------------------------------------------ synthetic
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


# ----------------------------------------------------------------------------------- files
def _jsonl_rows(path: Path, prefix: str = "") -> Iterator[dict[str, Any]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(
                    f"{prefix}{path}: line {lineno} is not UTF-8. Fix: re-encode the file as UTF-8."
                ) from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{prefix}{path}: line {lineno} is not valid JSON ({exc.msg}). Fix: one JSON object per line."
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{prefix}{path}: line {lineno} is a {type(row).__name__}, not an object. Fix: one JSON object per line."
                )
            yield row


def _parquet_rows(pf: Any, path: Path, prefix: str = "") -> Iterator[dict[str, Any]]:
    try:
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
            yield from batch.to_pylist()
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(
            f"{prefix}{path} is not a readable Parquet file ({exc.__class__.__name__}). Fix: rewrite it with pyarrow or pandas."
        ) from None


def _open_file(path: Path, spec: _Spec) -> _Table:
    label = f"{spec.prefix}dataset file {path}"
    if not path.is_file():
        if not path.suffix:
            hint = (
                f" (for the Hugging Face dataset write hf:{spec.source})"
                if "/" in spec.source
                else ""
            )
            raise DataError(
                f"{spec.prefix}dataset source {spec.source!r} is no file or folder{hint}. Fix: pass a "
                f".parquet/.jsonl file, a save_to_disk folder, hf:OWNER/NAME or a synthetic: source."
            )
        raise DataError(
            f"{label} does not exist. Fix: pass an existing .parquet or .jsonl file, or a synthetic: source."
        )
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json", ".parquet"} and path.stat().st_size == 0:
        raise DataError(
            f"{label} has no rows (it is empty). Fix: point {spec.field}.source at a file with prompts."
        )
    if suffix in {".jsonl", ".json"}:
        rows = _jsonl_rows(path, spec.prefix)
        first = next(rows, None)
        if first is None:
            return _Table(label, set(), iter(()))
        return _Table(label, _row_columns(first), _chain(first, rows))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataError(
                f"{spec.prefix}{path} is not a readable Parquet file ({exc.__class__.__name__}). Fix: rewrite it with pyarrow or pandas."
            ) from None
        return _Table(label, _schema_columns(pf.schema_arrow), _parquet_rows(pf, path, spec.prefix))
    raise DataError(
        f"{label} has suffix '{suffix}'. Fix: use .parquet or .jsonl (one JSON object per line)."
    )


def _chain(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest


# ------------------------------------------------------------------ datasets: hub and folders
def _env_offline() -> list[str]:
    """The offline variables set (truthy) in the environment now."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return [n for n in names if os.environ.get(n, "").strip().upper() in _TRUE]


def _hf_caches() -> tuple[Path, Path]:
    """(hub cache, datasets cache) as the environment names them now (huggingface_hub and
    datasets read theirs once, at import)."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache")
    home = Path(os.environ.get("HF_HOME") or xdg / "huggingface").expanduser()
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    cached = os.environ.get("HF_DATASETS_CACHE")
    return (Path(hub).expanduser() if hub else home / "hub"), (
        Path(cached).expanduser() if cached else home / "datasets"
    )


@contextmanager
def _offline_as_the_environment_says() -> Iterator[bool]:
    """Offline for datasets and huggingface_hub while the environment says so now (both read
    HF_HUB_OFFLINE once, at import, which may precede the variable). Yields whether offline."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    if not _env_offline():
        yield bool(datasets.config.HF_HUB_OFFLINE)
        return
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _listed(message: str) -> list[str] | None:
    """The Python list literal that ends one of datasets' messages ("... Available: ['a']")."""
    found = re.findall(r"\[[^\[\]]*\]", message)
    if not found:
        return None
    try:
        names = ast.literal_eval(found[-1])
    except (ValueError, SyntaxError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def _subset_error(exc: ValueError, base: str, spec: _Spec) -> DataError | None:
    """datasets' "BuilderConfig 'x' not found. Available: [...]" (and its cache / missing-name
    variants) as one line listing the subsets."""
    names = _listed(str(exc))
    if names is None or "config" not in str(exc).lower():
        return None
    fix = f"Fix: set {spec.field}.subset to one of them."
    if spec.subset is None:
        return DataError(f"{base} needs a subset; it has {', '.join(names)}. {fix}")
    return DataError(f"{base} has no subset {spec.subset!r}; it has {', '.join(names)}. {fix}")


def _split_error(split: str, names: list[str], base: str, spec: _Spec) -> DataError:
    return DataError(
        f"{base} has no split {split!r}; it has {', '.join(names)}. "
        f"Fix: set {spec.field}.split to one of them."
    )


def _check_split(builder: Any, base: str, spec: _Spec) -> None:
    """Refuse an unknown split before anything is downloaded or prepared."""
    if builder.config.data_files:
        names = list(builder.config.data_files)
    elif builder.info.splits:
        names = list(builder.info.splits)
    else:
        return  # not known before preparing: as_dataset says
    for part in spec.split.split("+"):
        name = part.split("[")[0].strip()  # "train[:100]" is a slice of train
        if name not in names:
            raise _split_error(name, names, base, spec)


def _build(path: str, spec: _Spec, base: str, revision: str | None) -> Any:
    """`datasets.load_dataset(path, subset, split=, revision=)` in its steps, so that a wrong
    subset or split is refused before the data is downloaded or prepared."""
    import datasets

    _, cache = _hf_caches()
    try:
        builder = datasets.load_dataset_builder(
            path, spec.subset, revision=revision, cache_dir=str(cache)
        )
    except ValueError as exc:
        error = _subset_error(exc, base, spec)
        if error is None:
            raise
        raise error from None
    _check_split(builder, base, spec)
    builder.download_and_prepare()
    try:
        return builder.as_dataset(split=spec.split)
    except ValueError as exc:
        names = _listed(str(exc))
        if names is None or "split" not in str(exc).lower():
            raise
        raise _split_error(spec.split, names, base, spec) from None


def _hub_snapshot(name: str, revision: str | None) -> Path | None:
    """The hub cache's snapshot folder of dataset `name` at `revision` (a branch, tag or commit
    `refs/` resolves), or None; never touches the network."""
    from huggingface_hub import snapshot_download

    hub, _ = _hf_caches()
    try:
        folder = snapshot_download(
            name, repo_type="dataset", revision=revision, cache_dir=str(hub), local_files_only=True
        )
    except Exception:  # LocalEntryNotFoundError, or a cache entry that is not whole
        return None
    return Path(folder)


def _not_cached(name: str, spec: _Spec, base: str, why: str) -> DataError:
    hub, cache = _hf_caches()
    folder = "datasets--" + name.replace("/", "--")
    rev = f" --revision {spec.revision}" if spec.revision else ""
    at = f" at revision {spec.revision}" if spec.revision else ""
    return DataError(
        f"{base}{at} is neither in the local Hugging Face cache (looked in {hub / folder} and "
        f"{cache}) nor reachable ({why}). Fix: on a machine with network run `hf download {name} "
        f"--repo-type dataset{rev}` and copy its ~/.cache/huggingface/hub/{folder} folder to "
        f"{hub / folder}, or save the data as a .parquet/.jsonl file or a save_to_disk folder "
        f"and set {spec.field}.source to it."
    )


def _load_hub(spec: _Spec, base: str) -> Any:
    """The split of hf:NAME: from the Hub when online (datasets falls back to its own cache when
    the Hub cannot be reached), else from the hub cache's snapshot, else datasets' cache."""
    import datasets

    name = spec.source.removeprefix(HF_PREFIX)
    with _offline_as_the_environment_says() as offline:
        why = f"{' / '.join(_env_offline()) or 'HF_HUB_OFFLINE'} is set"
        if not offline:
            try:
                return _build(name, spec, base, spec.revision)
            except ConnectionError as exc:
                why = _first_line(exc)
        snapshot = _hub_snapshot(name, spec.revision)
        if snapshot is not None:
            try:
                return _build(str(snapshot), spec, base, None)
            except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError):
                pass  # a snapshot holding only part of the repository (an interrupted download)
        if offline and spec.revision is None:
            try:
                return _build(name, spec, base, None)
            except ConnectionError:
                pass
    raise _not_cached(name, spec, base, why)


def _open_datasets(spec: _Spec) -> _Table:
    """hf:NAME or a local folder (save_to_disk, or data files in the Hub's layout)."""
    hub = spec.source.startswith(HF_PREFIX)
    name = spec.source.removeprefix(HF_PREFIX)
    base = (
        f"{spec.prefix}dataset {spec.source}"
        if hub
        else f"{spec.prefix}dataset folder {spec.source}"
    )
    if hub and not _HUB_ID.fullmatch(name):
        raise DataError(
            f"{base} is not a Hugging Face dataset id. Fix: write hf:OWNER/NAME, e.g. "
            "hf:BytedTsinghua-SIA/DAPO-Math-17k."
        )
    subset = f"subset {spec.subset}, " if spec.subset and hub else ""
    label = f"{base} ({subset}split {spec.split})"
    folder = Path(spec.source)
    try:
        if hub:
            ds = _load_hub(spec, base)
        elif (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            ds, label = _load_from_disk(folder, spec, base, label)
        else:
            ds = _build(str(folder), spec, base, None)
    except DataError:
        raise
    except Exception as exc:  # datasets' own errors: not found, gated, no data files, ...
        fix = (
            f"check the id at https://huggingface.co/datasets/{name} (a gated or private "
            "dataset needs `hf auth login`)"
            if hub
            else "point it at a folder written by save_to_disk or holding .parquet/.jsonl files"
        )
        raise DataError(f"{base} could not be loaded ({_first_line(exc)}). Fix: {fix}.") from None
    return _arrow_table(ds, label)


def _load_from_disk(folder: Path, spec: _Spec, base: str, label: str) -> tuple[Any, str]:
    """(dataset, label) of a save_to_disk folder: a DatasetDict's split by data.split; a single
    Dataset has no splits, so its label names none."""
    import datasets

    ds = datasets.load_from_disk(str(folder))
    if not isinstance(ds, datasets.DatasetDict):
        return ds, base
    if spec.split not in ds:
        raise _split_error(spec.split, list(ds), base, spec)
    return ds[spec.split], label


def _arrow_table(ds: Any, label: str) -> _Table:
    """A (memory-mapped) datasets.Dataset read one record batch at a time."""

    def rows() -> Iterator[dict[str, Any]]:
        for batch in ds.with_format("arrow").iter(batch_size=_BATCH_ROWS):
            yield from batch.to_pylist()

    return _Table(label, _schema_columns(ds.data.schema), rows())


# ------------------------------------------------------------------------------- columns
def _schema_columns(schema: Any, prefix: str = "") -> set[str]:
    """Column paths of an Arrow schema or struct type: 'a', and 'a.b' for a struct's fields."""
    import pyarrow as pa

    out: set[str] = set()
    for field in schema:
        out.add(prefix + field.name)
        if pa.types.is_struct(field.type):
            out |= _schema_columns(field.type, prefix + field.name + ".")
    return out


def _row_columns(row: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in row.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _row_columns(value, prefix + key + ".")
    return out


def _get(row: dict[str, Any], path: str) -> Any:
    """row[path], or the struct field a dotted path names ('reward_model.ground_truth')."""
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


# ---------------------------------------------------------------------------------- cells
def _utf8(value: Any) -> Any:
    """`value` as a str if it is UTF-8 text (bytes from a binary column are decoded); raises
    UnicodeError for text that is not UTF-8."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        value.encode("utf-8")  # lone surrogates ("\udcff" in JSON) are not UTF-8
    return value


def _text(value: Any, label: str, i: int, column: str) -> Any:
    """`_utf8(value)`, or one DataError naming row i's column."""
    try:
        return _utf8(value)
    except UnicodeError:
        raise DataError(
            f"{label}: row {i} has a '{column}' that is not UTF-8 text. "
            "Fix: re-encode that row as UTF-8 (or drop it)."
        ) from None


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


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _chat(value: Any, where: str, col: str, field: str) -> list[dict[str, str]]:
    """A chat cell as its list of {role, content} turns, or one DataError naming the problem."""
    if not isinstance(value, list):
        raise DataError(
            f"{where} has a '{col}' that is not a list of {{role, content}} turns (it is "
            f'{_kind(value)}). Fix: give each row a list like [{{"role": "user", "content": '
            f'"..."}}], or unset {field}.messages_column and use {field}.prompt_column.'
        )
    turns = []
    for j, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(
                f"{where}: turn {j} of '{col}' is not an object with 'role' and 'content'. "
                'Fix: write every turn as {"role": ..., "content": ...}.'
            )
        role = turn["role"]
        if role not in CHAT_ROLES:
            raise DataError(
                f"{where}: turn {j} of '{col}' has role {role!r}; allowed: "
                f"{', '.join(CHAT_ROLES)}. Fix: rename that role or drop the turn."
            )
        try:
            content = _utf8(turn["content"])
        except UnicodeError:
            raise DataError(
                f"{where}: turn {j} ({role}) of '{col}' is not UTF-8 text. "
                "Fix: re-encode that row as UTF-8 (or drop it)."
            ) from None
        if not isinstance(content, str) or not content.strip():
            raise DataError(
                f"{where}: turn {j} ({role}) of '{col}' has empty or non-text content. "
                "Fix: fill that turn with text or drop it."
            )
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "user" for t in turns):
        raise DataError(
            f"{where} has no user turn in '{col}'. Fix: every chat needs at least one "
            '{"role": "user"} turn (or drop the row).'
        )
    if turns[-1]["role"] == "assistant":
        raise DataError(
            f"{where}: '{col}' ends with an assistant turn, which would put a reply (often the "
            "answer) into the prompt. Fix: drop the final assistant turn; the model writes it."
        )
    return turns


def _prompt(raw: dict[str, Any], i: int, label: str, spec: _Spec) -> dict[str, str]:
    """{"prompt": ...} (plus "messages" with messages_column) of row i."""
    if spec.messages_column:
        col = spec.messages_column
        turns = _chat(_get(raw, col), f"{label}: row {i}", col, spec.field)
        last_user = next(t["content"] for t in reversed(turns) if t["role"] == "user")
        return {"prompt": last_user, "messages": json.dumps(turns, ensure_ascii=False)}
    prompt = _text(_get(raw, spec.prompt_column), label, i, spec.prompt_column)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(
            f"{label}: row {i} has an empty or non-text '{spec.prompt_column}'. Fix: drop or fill that row."
        )
    return {"prompt": prompt}


def _prompt_id(raw: dict[str, Any], i: int, label: str, spec: _Spec) -> str:
    if not spec.id_column:
        return f"p{i:07d}"
    raw_id = _text(_get(raw, spec.id_column), label, i, spec.id_column)
    if _is_null(raw_id) or str(raw_id).strip() == "":
        raise DataError(
            f"{label}: prompt id is empty or null in row {i} (column "
            f"'{spec.id_column}'). Fix: give every row a unique, non-empty id in "
            f"'{spec.id_column}', or unset {spec.field}.id_column to number the rows instead."
        )
    return str(raw_id)


def _answer(raw: dict[str, Any], i: int, label: str, where: str, spec: _Spec) -> str:
    from scalerl.rewards.base import has_unclosed_box
    from scalerl.rewards.synthetic import arithmetic_reference

    col = spec.answer_column
    value = _text(_get(raw, col), label, i, col)
    if _is_null(value) or (isinstance(value, str) and value.strip() == ""):
        raise DataError(
            f"{label}: row {i} has no '{col}'. Fix: every prompt needs a reference answer."
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
    if spec.task == "arithmetic":
        try:
            answer = str(arithmetic_reference(answer))
        except ValueError:
            raise DataError(
                f"{where} has '{col}' = {answer[:40]!r}, not an integer, but {spec.field}.task = "
                f"arithmetic checks exact integers. Fix: give the integer answer, or set "
                f"{spec.field}.task=math to compare answers with math-verify."
            ) from None
    return answer


def _open(spec: _Spec) -> _Table:
    if spec.source.startswith(HF_PREFIX) or Path(spec.source).is_dir():
        return _open_datasets(spec)
    return _open_file(Path(spec.source), spec)


def _read_rows(spec: _Spec) -> list[dict[str, str]]:
    """The rows of one file / hf: / folder source, checked, in the source's order (the first
    spec.limit when set)."""
    table = _open(spec)
    label = table.label
    needed = (
        ([spec.messages_column] if spec.messages_column else [spec.prompt_column])
        + [spec.answer_column]
        + ([spec.id_column] if spec.id_column else [])
    )
    missing = [c for c in needed if c not in table.columns]
    if table.columns and missing:
        names = "data.prompt_column / data.answer_column / data.id_column"
        if spec.field != "data" or spec.messages_column:
            names = " / ".join(
                f"{spec.field}.{c}_column" for c in ("prompt", "messages", "answer", "id")
            )
        raise DataError(
            f"{label} lacks column(s) {', '.join(missing)}; it has {', '.join(sorted(table.columns))}. "
            f"Fix: rename the columns or set {names}."
        )
    out: list[dict[str, str]] = []
    for i, raw in enumerate(table.rows):
        if spec.limit is not None and len(out) >= spec.limit:
            break
        prompt = _prompt(raw, i, label, spec)
        pid = _prompt_id(raw, i, label, spec)
        answer = _answer(raw, i, label, f"{label}: row {i} (prompt id {pid!r})", spec)
        out.append({"prompt_id": pid, **prompt, "answer": answer, "task": spec.task})
    if not out:
        raise DataError(
            f"{label} has no rows. Fix: point {spec.field}.source at a file with prompts."
        )
    seen: set[str] = set()
    dupes = sorted(
        {r["prompt_id"] for r in out if r["prompt_id"] in seen or seen.add(r["prompt_id"])}
    )
    if dupes:
        shown = ", ".join(dupes[:5]) + (" ..." if len(dupes) > 5 else "")
        raise DataError(
            f"{label}: duplicate prompt ids in '{spec.id_column}': {shown}. Fix: make ids unique."
        )
    return out


def _data_spec(cfg: DataConfig) -> _Spec:
    return _Spec(
        source=cfg.source,
        subset=cfg.subset,
        split=cfg.split,
        revision=cfg.revision,
        prompt_column=cfg.prompt_column,
        answer_column=cfg.answer_column,
        id_column=cfg.id_column,
        messages_column=cfg.messages_column,
        task="math" if cfg.task == "auto" else cfg.task,
    )


def default_task(data_cfg: DataConfig) -> str:
    """The verifier data.task implies: itself, or for 'auto' the synthetic task's own ('math'
    for files and datasets)."""
    if data_cfg.task != "auto":
        return data_cfg.task
    name = data_cfg.source.removeprefix(SYNTHETIC_PREFIX)
    if data_cfg.source.startswith(SYNTHETIC_PREFIX):
        return "countdown" if name.startswith("countdown") else "arithmetic"
    return "math"


def load_eval_set(set_cfg: EvalSetConfig, data_cfg: DataConfig) -> list[dict[str, str]]:
    """The rows of one evaluation.sets entry, in the training rows' format, in the source's
    order; task 'auto' takes the verifier data.task implies; max_prompts keeps the first N."""
    field = f"evaluation.sets[{set_cfg.name!r}]"
    if set_cfg.source.startswith(SYNTHETIC_PREFIX):
        raise DataError(
            f"evaluation set {set_cfg.name!r}: source {set_cfg.source!r} is synthetic. Fix: give "
            f"{field}.source a .parquet/.jsonl file, a save_to_disk folder or hf:OWNER/NAME (the "
            "held-out split of a synthetic data.source is the set 'heldout')."
        )
    spec = _Spec(
        source=set_cfg.source,
        subset=set_cfg.subset,
        split=set_cfg.split,
        revision=set_cfg.revision,
        prompt_column=set_cfg.prompt_column,
        answer_column=set_cfg.answer_column,
        id_column=set_cfg.id_column,
        messages_column=set_cfg.messages_column,
        task=default_task(data_cfg) if set_cfg.task == "auto" else set_cfg.task,
        field=field,
        limit=set_cfg.max_prompts,
        prefix=f"evaluation set {set_cfg.name!r}: ",
    )
    return _read_rows(spec)


def load_prompts(cfg: DataConfig) -> PromptSet:
    """All prompts of the run, split into train and held-out eval by a seeded shuffle."""
    synthetic = cfg.source.startswith(SYNTHETIC_PREFIX)
    rows = _synthetic(cfg) if synthetic else _read_rows(_data_spec(cfg))
    if cfg.task != "auto" and synthetic:
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
    if synthetic:
        train = train[: cfg.num_train_prompts]
    return PromptSet(train=train, eval=[rows[i] for i in sorted(held)])
