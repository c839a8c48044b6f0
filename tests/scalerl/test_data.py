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


# ---------------------------------------------------------------- answer columns that are numbers
def _parquet(tmp_path, answers, name="a.parquet", **columns):
    path = tmp_path / name
    prompts = [f"{i}+1=" for i in range(len(answers))]
    pq.write_table(pa.table({"prompt": prompts, "answer": answers, **columns}), path)
    return path


def test_float_answers_with_integral_values_load_as_integers(tmp_path):
    """What pandas writes for an integer column that held a null: float64 (142.0)."""
    answers = [1.0, 2.0, -3.0, 142.0, 0.0]
    path = _parquet(tmp_path, pa.array(answers, pa.float64()))
    for task in ("arithmetic", "math", "auto"):
        got = load_prompts(_cfg(path, task=task))
        by_prompt = {r["prompt"]: r["answer"] for r in got.train + got.eval}
        assert by_prompt == {"0+1=": "1", "1+1=": "2", "2+1=": "-3", "3+1=": "142", "4+1=": "0"}


def test_int_answers_load_as_their_digits(tmp_path):
    path = _parquet(tmp_path, pa.array([5, -12, 10**15], pa.int64()))
    got = load_prompts(_cfg(path, task="arithmetic"))
    assert sorted(r["answer"] for r in got.train + got.eval) == ["-12", "1000000000000000", "5"]


def test_text_answers_with_integral_values_are_canonical_for_arithmetic(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "answer": "142.0"}\n{"prompt": "b", "answer": " 7 "}\n')
    got = load_prompts(_cfg(path, task="arithmetic"))
    assert sorted(r["answer"] for r in got.train + got.eval) == ["142", "7"]
    math = load_prompts(_cfg(path))  # math compares with math-verify: kept as written
    assert sorted(r["answer"] for r in math.train + math.eval) == [" 7 ", "142.0"]


def test_a_non_integer_float_answer_is_refused_for_arithmetic_only(tmp_path):
    path = _parquet(tmp_path, pa.array([1.0, 142.5], pa.float64()))
    with pytest.raises(DataError) as info:
        load_prompts(_cfg(path, task="arithmetic"))
    assert str(info.value) == (
        f"dataset file {path}: row 1 (prompt id 'p0000001') has 'answer' = '142.5', not an "
        "integer, but data.task = arithmetic checks exact integers. Fix: give the integer "
        "answer, or set data.task=math to compare answers with math-verify."
    )
    got = load_prompts(_cfg(path, task="math"))
    assert sorted(r["answer"] for r in got.train + got.eval) == ["1", "142.5"]


def test_a_null_float_answer_is_a_missing_answer(tmp_path):
    path = _parquet(tmp_path, pa.array([1.0, None, 3.0], pa.float64()))
    with pytest.raises(DataError, match=r"row 1 has no 'answer'\. Fix: every prompt needs"):
        load_prompts(_cfg(path, task="arithmetic"))
    nan = _parquet(tmp_path, pa.array([1.0, float("nan")], pa.float64()), name="nan.parquet")
    with pytest.raises(DataError, match=r"row 1 has no 'answer'"):
        load_prompts(_cfg(nan))


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (True, "has a boolean 'answer' (True)"),
        (float("inf"), "has 'answer' = inf, not a finite number"),
    ],
)
def test_answers_that_are_not_text_or_finite_numbers_are_refused(tmp_path, answer, expected):
    path = tmp_path / "x.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "answer": "1"})
        + "\n"
        + json.dumps({"prompt": "b", "answer": answer})
        + "\n"
    )
    with pytest.raises(DataError, match="Fix:") as info:
        load_prompts(_cfg(path))
    assert f"dataset file {path}: row 1 (prompt id 'p0000001') {expected}" in str(info.value)


def test_json_object_answers_load_as_json_text(tmp_path):
    path = tmp_path / "cd.jsonl"
    rows = [{"prompt": f"Make {t}:", "answer": {"target": t, "numbers": [1, 2]}} for t in (3, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_prompts(_cfg(path, task="countdown"))
    assert sorted(json.loads(r["answer"])["target"] for r in got.train + got.eval) == [1, 3]


# ------------------------------------------------------------ answers that can never be matched
def test_an_answer_with_a_nul_byte_is_refused(tmp_path):
    path = tmp_path / "nul.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "4\\u00002"}\n')
    with pytest.raises(DataError) as info:
        load_prompts(_cfg(path))
    assert str(info.value) == (
        f"dataset file {path}: row 1 (prompt id 'p0000001') has a NUL byte (\\x00) in 'answer', "
        "which no completion can match. Fix: remove the NUL characters from that answer (or "
        "drop the row)."
    )


@pytest.mark.parametrize(
    "answer", ["\\boxed{12", "\\boxed{\\frac{1}{2}", "\\boxed{1} or \\boxed{2", "\\fbox{3"]
)
def test_an_answer_with_an_unclosed_boxed_is_refused(tmp_path, answer):
    path = tmp_path / "box.jsonl"
    path.write_text(
        json.dumps({"id": "q1", "prompt": "a", "answer": "1"})
        + "\n"
        + json.dumps({"id": "q2", "prompt": "b", "answer": answer})
        + "\n"
    )
    with pytest.raises(DataError) as info:
        load_prompts(_cfg(path, id_column="id"))
    assert str(info.value) == (
        f"dataset file {path}: row 1 (prompt id 'q2') has an unclosed \\boxed{{ in 'answer' "
        "(a '{' without its '}'), which no completion can match. Fix: close the braces or give "
        "the bare answer (e.g. 42 rather than \\boxed{42})."
    )


def test_balanced_boxed_answers_load(tmp_path):
    path = tmp_path / "ok.jsonl"
    answers = ["\\boxed{12}", "\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", "{"]
    path.write_text("".join(json.dumps({"prompt": a, "answer": a}) + "\n" for a in answers))
    got = load_prompts(_cfg(path))
    assert sorted(r["answer"] for r in got.train + got.eval) == sorted(answers)


# ------------------------------------------------------------------------------- prompt ids
@pytest.mark.parametrize("bad_id", [None, "", "  "])
def test_a_null_or_empty_prompt_id_is_named_as_such(tmp_path, bad_id):
    path = tmp_path / "ids.jsonl"
    rows = [{"id": "a", "prompt": "x", "answer": "1"}] + [
        {"id": bad_id, "prompt": p, "answer": "2"} for p in ("y", "z")
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as info:
        load_prompts(_cfg(path, id_column="id"))
    assert str(info.value) == (
        f"dataset file {path}: prompt id is empty or null in row 1 (column 'id'). Fix: give "
        "every row a unique, non-empty id in 'id', or unset data.id_column to number the rows "
        "instead."
    )


def test_a_null_float_prompt_id_in_parquet_is_named_as_such(tmp_path):
    path = _parquet(tmp_path, ["1", "2"], uid=pa.array([1.0, None], pa.float64()))
    with pytest.raises(DataError, match=r"prompt id is empty or null in row 1 \(column 'uid'\)"):
        load_prompts(_cfg(path, id_column="uid"))
