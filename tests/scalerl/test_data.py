"""Prompt datasets: synthetic and file sources, the split, and the message every bad file gets."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scalerl.config import DataConfig
from scalerl.data import DataError, load_prompts


def test_synthetic_split_is_disjoint_seeded_and_sized():
    cfg = DataConfig(
        source="synthetic:arithmetic", num_train_prompts=50, num_eval_prompts=10, seed=3
    )
    a, b = load_prompts(cfg), load_prompts(cfg)
    assert a == b
    assert (len(a.train), len(a.eval)) == (50, 10)
    assert not {r["prompt_id"] for r in a.train} & {r["prompt_id"] for r in a.eval}
    assert {r["task"] for r in a.train} == {"arithmetic"}


def test_jsonl_and_parquet_files(tmp_path):
    rows = [{"q": f"What is {i}+1?", "a": str(i + 1), "uid": f"u{i}"} for i in range(12)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        cfg = DataConfig(
            source=str(path),
            prompt_column="q",
            answer_column="a",
            id_column="uid",
            num_eval_prompts=2,
        )
        got = load_prompts(cfg)
        assert (len(got.train), len(got.eval)) == (10, 2)
        assert {r["task"] for r in got.train} == {"math"}
        assert sorted(r["prompt_id"] for r in got.train + got.eval) == sorted(
            r["uid"] for r in rows
        )


def _cfg(path, **kw):
    return DataConfig(source=str(path), num_eval_prompts=1, **kw)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "has no rows"),
        ('{"prompt": "x"}\n{"prompt": "y"}\n', "lacks column(s) answer"),
        (
            '{"prompt": "", "answer": "1"}\n{"prompt": "y", "answer": "2"}\n',
            "row 0 has an empty or non-text 'prompt'",
        ),
        (
            '{"prompt": "x", "answer": null}\n{"prompt": "y", "answer": "2"}\n',
            "row 0 has no 'answer'",
        ),
        ("not json\n", "line 1 is not valid JSON"),
        ("[1, 2]\n", "line 1 is a list, not an object"),
    ],
)
def test_bad_jsonl_files(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="Fix:") as info:
        load_prompts(_cfg(path))
    assert expected in str(info.value)


def test_non_utf8_duplicates_missing_and_too_small(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"prompt": "caf\xe9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="line 1 is not UTF-8"):
        load_prompts(_cfg(path))
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        '{"id": "a", "prompt": "x", "answer": "1"}\n{"id": "a", "prompt": "y", "answer": "2"}\n'
    )
    with pytest.raises(DataError, match="duplicate prompt ids in 'id': a"):
        load_prompts(_cfg(dup, id_column="id"))
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(_cfg(tmp_path / "missing.jsonl"))
    small = tmp_path / "small.jsonl"
    small.write_text('{"prompt": "x", "answer": "1"}\n')
    with pytest.raises(DataError, match="not more than data.num_eval_prompts = 1"):
        load_prompts(_cfg(small))
    with pytest.raises(DataError, match="unknown synthetic source"):
        load_prompts(DataConfig(source="synthetic:sudoku"))
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(DataError, match="suffix '.csv'"):
        load_prompts(_cfg(csv))
