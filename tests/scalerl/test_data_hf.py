"""Prompt sources through `datasets`, all offline: save_to_disk folders (Dataset, DatasetDict),
hf:OWNER/NAME served from the local Hugging Face cache (the hub cache snapshot `hf download`
leaves, and the prepared cache an earlier load_dataset leaves), chat-format columns, dotted
column paths, evaluation sets, and the one line every bad input of these gets.

Every test runs with HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1 and HF_HOME in its own temporary
directory; nothing here reaches a network."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scalerl.config import DataConfig, EvalSetConfig
from scalerl.data import DataError, load_eval_set, load_prompts

datasets = pytest.importorskip("datasets")

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    """HF_HOME under tmp_path, offline; no other cache location from this machine."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path / "hf"


def _chat_rows(n: int, start: int = 0) -> list[dict]:
    """DAPO-Math-17k's shape: the prompt a chat list, the answer a struct field."""
    return [
        {
            "prompt": [
                {"role": "system", "content": "Put the answer in \\boxed{}."},
                {"role": "user", "content": f"What is {i} + {i}?"},
            ],
            "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
            "extra_info": {"index": f"q{i}"},
        }
        for i in range(start, start + n)
    ]


def _chat_cfg(source, **kw) -> DataConfig:
    base = dict(
        source=str(source),
        messages_column="prompt",
        answer_column="reward_model.ground_truth",
        id_column="extra_info.index",
        num_eval_prompts=0,
    )
    return DataConfig(**(base | kw))


def _expected(rows: list[dict]) -> list[dict]:
    """The rows load_prompts must give for _chat_rows, written out from the input."""
    return [
        {
            "prompt_id": r["extra_info"]["index"],
            "prompt": r["prompt"][-1]["content"],
            "messages": json.dumps(r["prompt"], ensure_ascii=False),
            "answer": r["reward_model"]["ground_truth"],
            "task": "math",
        }
        for r in rows
    ]


# ------------------------------------------------------------------ save_to_disk folders
def test_a_save_to_disk_dataset_with_a_chat_column_and_a_dotted_answer(tmp_path):
    rows = _chat_rows(5)
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    got = load_prompts(_chat_cfg(folder))
    assert got.eval == []
    assert got.train == _expected(rows)
    assert json.loads(got.train[0]["messages"])[1] == {"role": "user", "content": "What is 0 + 0?"}


def test_a_save_to_disk_dataset_dict_takes_data_split(tmp_path):
    train, test = _chat_rows(4), _chat_rows(2, start=10)
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(folder))
    assert load_prompts(_chat_cfg(folder)).train == _expected(train)
    assert load_prompts(_chat_cfg(folder, split="test")).train == _expected(test)
    with pytest.raises(DataError) as info:
        load_prompts(_chat_cfg(folder, split="validation"))
    assert str(info.value) == (
        f"dataset folder {folder} has no split 'validation'; it has train, test. "
        "Fix: set data.split to one of them."
    )


def test_rows_without_a_messages_column_carry_no_messages_key(tmp_path):
    folder = tmp_path / "plain"
    datasets.Dataset.from_list(
        [{"question": f"{i} + 1 =", "answer": i + 1} for i in range(3)]
    ).save_to_disk(str(folder))
    got = load_prompts(DataConfig(source=str(folder), prompt_column="question", num_eval_prompts=1))
    rows = sorted(got.train + got.eval, key=lambda r: r["prompt_id"])
    assert rows == [
        {"prompt_id": f"p{i:07d}", "prompt": f"{i} + 1 =", "answer": str(i + 1), "task": "math"}
        for i in range(3)
    ]


def test_a_folder_of_data_files_in_the_hub_layout_loads(tmp_path):
    """What `hf download OWNER/NAME --repo-type dataset --local-dir DIR` leaves."""
    rows = _chat_rows(3)
    (tmp_path / "local" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "local/data/train-00000-of-00001.parquet")
    assert load_prompts(_chat_cfg(tmp_path / "local")).train == _expected(rows)


# --------------------------------------------------------------------- hf: from the cache
def _hub_snapshot(hf_home, repo: str, splits: dict[str, list[dict]], ref: str = "main"):
    """The hub cache layout `hf download REPO --repo-type dataset` writes:
    hub/datasets--OWNER--NAME/{refs/<ref> = sha, snapshots/<sha>/data/<split>-....parquet}."""
    root = hf_home / "hub" / ("datasets--" + repo.replace("/", "--"))
    snap = root / "snapshots" / SHA / "data"
    snap.mkdir(parents=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), snap / f"{split}-00000-of-00001.parquet")
    (root / "refs").mkdir()
    (root / "refs" / ref).write_text(SHA)
    return root


def test_hf_source_is_read_from_the_hub_cache_offline(offline_hf):
    train, test = _chat_rows(6), _chat_rows(2, start=50)
    _hub_snapshot(offline_hf, "owner/mathset", {"train": train, "test": test})
    got = load_prompts(_chat_cfg("hf:owner/mathset"))
    assert got.train == _expected(train)
    assert load_prompts(_chat_cfg("hf:owner/mathset", split="test")).train == _expected(test)
    pinned = load_prompts(_chat_cfg("hf:owner/mathset", revision=SHA))
    assert pinned.train == _expected(train)


def test_hf_wrong_split_or_subset_lists_the_ones_there(offline_hf):
    _hub_snapshot(offline_hf, "owner/mathset", {"train": _chat_rows(2), "test": _chat_rows(1)})
    with pytest.raises(DataError) as info:
        load_prompts(_chat_cfg("hf:owner/mathset", split="validation"))
    assert str(info.value) == (
        "dataset hf:owner/mathset has no split 'validation'; it has train, test. "
        "Fix: set data.split to one of them."
    )
    with pytest.raises(DataError) as info:
        load_prompts(_chat_cfg("hf:owner/mathset", subset="hard"))
    assert str(info.value) == (
        "dataset hf:owner/mathset has no subset 'hard'; it has default. "
        "Fix: set data.subset to one of them."
    )


def test_hf_source_is_read_from_the_datasets_cache_an_earlier_load_left(offline_hf, tmp_path):
    """The prepared Arrow cache of an online load_dataset('owner/cached') is
    $HF_HOME/datasets/owner___cached/<subset>/<version>/<hash>/; built here by preparing the
    same files locally and placing the result under that name."""
    rows = _chat_rows(4)
    src = (
        tmp_path / "cached"
    )  # the folder's name is the dataset's: its files are cached-train.arrow
    (src / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), src / "data/train-00000-of-00001.parquet")
    builder = datasets.load_dataset_builder(str(src), cache_dir=str(tmp_path / "prep"))
    builder.download_and_prepare()
    prepared = tmp_path / "prep" / "cached"  # <cache>/<name>/<subset>/<version>/<hash>
    assert (prepared / "default" / "0.0.0").is_dir()
    shutil.copytree(prepared, offline_hf / "datasets" / "owner___cached")
    assert load_prompts(_chat_cfg("hf:owner/cached")).train == _expected(rows)


def test_hf_source_neither_cached_nor_reachable_is_one_line(offline_hf):
    with pytest.raises(DataError) as info:
        load_prompts(_chat_cfg("hf:owner/missing"))
    hub = offline_hf / "hub" / "datasets--owner--missing"
    assert str(info.value) == (
        f"dataset hf:owner/missing is neither in the local Hugging Face cache (looked in {hub} "
        f"and {offline_hf / 'datasets'}) nor reachable (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is "
        "set). Fix: on a machine with network run `hf download owner/missing --repo-type "
        "dataset` and copy its ~/.cache/huggingface/hub/datasets--owner--missing folder to "
        f"{hub}, or save the data as a .parquet/.jsonl file or a save_to_disk folder and set "
        "data.source to it."
    )
    assert not offline_hf.exists(), "a failed lookup wrote into the cache"


def test_hf_revision_missing_from_the_cache_names_it(offline_hf):
    _hub_snapshot(offline_hf, "owner/mathset", {"train": _chat_rows(2)})
    with pytest.raises(
        DataError, match=r"^dataset hf:owner/mathset at revision v2 is neither"
    ) as info:
        load_prompts(_chat_cfg("hf:owner/mathset", revision="v2"))
    assert "`hf download owner/mathset --repo-type dataset --revision v2`" in str(info.value)


def test_a_bad_hub_id_and_a_missing_folder(tmp_path):
    with pytest.raises(DataError) as info:
        load_prompts(DataConfig(source="hf:owner/has space"))
    assert str(info.value) == (
        "dataset hf:owner/has space is not a Hugging Face dataset id. Fix: write "
        "hf:OWNER/NAME, e.g. hf:BytedTsinghua-SIA/DAPO-Math-17k."
    )
    with pytest.raises(DataError) as info:
        load_prompts(DataConfig(source="owner/mathset"))
    assert str(info.value) == (
        "dataset source 'owner/mathset' is no file or folder (for the Hugging Face dataset "
        "write hf:owner/mathset). Fix: pass a .parquet/.jsonl file, a save_to_disk folder, "
        "hf:OWNER/NAME or a synthetic: source."
    )


# ------------------------------------------------------------------------------ chat column
def _jsonl(tmp_path, rows, name="chat.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD_CHAT = [{"role": "user", "content": "1 + 1 ="}]


@pytest.mark.parametrize(
    ("chat", "expected"),
    [
        (
            "1 + 1 =",
            "row 1 has a 'messages' that is not a list of {role, content} turns (it is a str). "
            'Fix: give each row a list like [{"role": "user", "content": "..."}], or unset '
            "data.messages_column and use data.prompt_column.",
        ),
        (
            None,
            "row 1 has a 'messages' that is not a list of {role, content} turns (it is null).",
        ),
        (
            [{"role": "user"}],
            "row 1: turn 0 of 'messages' is not an object with 'role' and 'content'. "
            'Fix: write every turn as {"role": ..., "content": ...}.',
        ),
        (
            ["hi"],
            "row 1: turn 0 of 'messages' is not an object with 'role' and 'content'.",
        ),
        (
            [{"role": "tool", "content": "x"}, {"role": "user", "content": "y"}],
            "row 1: turn 0 of 'messages' has role 'tool'; allowed: system, user, assistant. "
            "Fix: rename that role or drop the turn.",
        ),
        (
            [{"role": "system", "content": "Be brief."}],
            "row 1 has no user turn in 'messages'. Fix: every chat needs at least one "
            '{"role": "user"} turn (or drop the row).',
        ),
        (
            [],
            "row 1 has no user turn in 'messages'.",
        ),
        (
            [{"role": "user", "content": "  "}],
            "row 1: turn 0 (user) of 'messages' has empty or non-text content. "
            "Fix: fill that turn with text or drop it.",
        ),
        (
            [{"role": "user", "content": ["a", "b"]}],
            "row 1: turn 0 (user) of 'messages' has empty or non-text content.",
        ),
        (
            [{"role": "user", "content": "1 + 1 ="}, {"role": "assistant", "content": "2"}],
            "row 1: 'messages' ends with an assistant turn, which would put a reply (often the "
            "answer) into the prompt. Fix: drop the final assistant turn; the model writes it.",
        ),
    ],
)
def test_bad_chats_are_one_line(tmp_path, chat, expected):
    path = _jsonl(
        tmp_path,
        [{"messages": GOOD_CHAT, "answer": "2"}, {"messages": chat, "answer": "2"}],
    )
    with pytest.raises(DataError) as info:
        load_prompts(DataConfig(source=str(path), messages_column="messages", num_eval_prompts=0))
    assert str(info.value).startswith(f"dataset file {path}: {expected}")
    assert str(info.value).count("\n") == 0 and "Fix: " in str(info.value)


def test_a_chat_with_a_lone_surrogate_is_not_utf8(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "\\udcff"}], "answer": "1"}\n')
    with pytest.raises(DataError) as info:
        load_prompts(DataConfig(source=str(path), messages_column="messages", num_eval_prompts=0))
    assert str(info.value) == (
        f"dataset file {path}: row 0: turn 0 (user) of 'messages' is not UTF-8 text. "
        "Fix: re-encode that row as UTF-8 (or drop it)."
    )


def test_a_chat_keeps_the_last_user_turn_as_prompt_and_only_role_and_content(tmp_path):
    chat = [
        {"role": "user", "content": "Wie viel ist 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Und 3 + 3? Äußere dich kurz.", "name": "x"},
    ]
    path = _jsonl(tmp_path, [{"messages": chat, "answer": "6"}])
    (row,) = load_prompts(
        DataConfig(source=str(path), messages_column="messages", num_eval_prompts=0)
    ).train
    assert row["prompt"] == "Und 3 + 3? Äußere dich kurz."
    assert row["messages"] == json.dumps(
        [{"role": t["role"], "content": t["content"]} for t in chat], ensure_ascii=False
    )
    assert "Äußere" in row["messages"]  # ensure_ascii=False: the text as written


# ------------------------------------------------------------------------- column paths
def test_dotted_paths_in_jsonl_and_parquet_and_the_missing_column_line(tmp_path):
    rows = [{"q": {"text": f"{i} + 1 ="}, "meta": {"gt": i + 1, "id": f"id{i}"}} for i in range(3)]
    jsonl = _jsonl(tmp_path, rows, "d.jsonl")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        cfg = DataConfig(
            source=str(path),
            prompt_column="q.text",
            answer_column="meta.gt",
            id_column="meta.id",
            num_eval_prompts=0,
        )
        assert load_prompts(cfg).train == [
            {"prompt_id": f"id{i}", "prompt": f"{i} + 1 =", "answer": str(i + 1), "task": "math"}
            for i in range(3)
        ]
        with pytest.raises(DataError) as info:
            load_prompts(cfg.model_copy(update={"answer_column": "meta.answer"}))
        assert str(info.value) == (
            f"dataset file {path} lacks column(s) meta.answer; it has meta, meta.gt, meta.id, "
            "q, q.text. Fix: rename the columns or set data.prompt_column / "
            "data.answer_column / data.id_column."
        )


def test_a_missing_chat_column_names_messages_column_in_the_fix(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "x", "answer": "1"}])
    with pytest.raises(DataError) as info:
        load_prompts(DataConfig(source=str(path), messages_column="chat", num_eval_prompts=0))
    assert str(info.value) == (
        f"dataset file {path} lacks column(s) chat; it has answer, prompt. Fix: rename the "
        "columns or set data.prompt_column / data.messages_column / data.answer_column / "
        "data.id_column."
    )


def test_parquet_is_read_in_batches_in_order(tmp_path):
    """More rows than one record batch (1,024): every row, in file order."""
    n = 2_500
    path = tmp_path / "big.parquet"
    pq.write_table(
        pa.table({"prompt": [f"{i} + 0 =" for i in range(n)], "answer": list(range(n))}),
        path,
        row_group_size=700,
    )
    got = load_prompts(DataConfig(source=str(path), num_eval_prompts=0)).train
    assert [r["prompt"] for r in got] == [f"{i} + 0 =" for i in range(n)]
    assert [r["answer"] for r in got] == [str(i) for i in range(n)]


# ------------------------------------------------------------------------ evaluation sets
def test_load_eval_set_reads_its_own_source_first_n_rows(tmp_path):
    rows = _chat_rows(6)
    folder = tmp_path / "aime"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    set_cfg = EvalSetConfig(
        name="aime",
        source=str(folder),
        messages_column="prompt",
        answer_column="reward_model.ground_truth",
        id_column="extra_info.index",
        max_prompts=4,
    )
    assert load_eval_set(set_cfg, DataConfig()) == [
        {**r, "task": "arithmetic"} for r in _expected(rows[:4])
    ]  # data.source synthetic:arithmetic, task auto: the arithmetic verifier
    files = DataConfig(source=str(tmp_path / "train.jsonl"))
    assert {r["task"] for r in load_eval_set(set_cfg, files)} == {"math"}
    countdown = DataConfig(source="synthetic:countdown")
    assert {r["task"] for r in load_eval_set(set_cfg, countdown)} == {"countdown"}
    pinned = set_cfg.model_copy(update={"task": "math"})
    assert {r["task"] for r in load_eval_set(pinned, countdown)} == {"math"}


def test_load_eval_set_errors_name_the_set(tmp_path):
    path = _jsonl(tmp_path, [{"question": "x", "answer": "1"}], "e.jsonl")
    set_cfg = EvalSetConfig(name="math500", source=str(path))
    with pytest.raises(DataError) as info:
        load_eval_set(set_cfg, DataConfig())
    assert str(info.value) == (
        f"evaluation set 'math500': dataset file {path} lacks column(s) prompt; it has answer, "
        "question. Fix: rename the columns or set evaluation.sets['math500'].prompt_column / "
        "evaluation.sets['math500'].messages_column / evaluation.sets['math500'].answer_column "
        "/ evaluation.sets['math500'].id_column."
    )
    with pytest.raises(DataError) as info:
        load_eval_set(EvalSetConfig(name="gen", source="synthetic:arithmetic"), DataConfig())
    assert str(info.value) == (
        "evaluation set 'gen': source 'synthetic:arithmetic' is synthetic. Fix: give "
        "evaluation.sets['gen'].source a .parquet/.jsonl file, a save_to_disk folder or "
        "hf:OWNER/NAME (the held-out split of a synthetic data.source is the set 'heldout')."
    )


def test_no_held_out_split_with_num_eval_prompts_zero(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": f"{i}", "answer": str(i)} for i in range(4)])
    got = load_prompts(DataConfig(source=str(path), num_eval_prompts=0))
    assert got.eval == [] and [r["prompt"] for r in got.train] == ["0", "1", "2", "3"]
    synthetic = load_prompts(
        DataConfig(source="synthetic:arithmetic", num_train_prompts=5, num_eval_prompts=0)
    )
    assert synthetic.eval == [] and len(synthetic.train) == 5
