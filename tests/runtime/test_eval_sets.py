"""Evaluation sets (runtime/evaluation.py): every set sampled at a version with one engine load,
one eval shard per set with an `eval_set` column, an "eval_sets" metrics row per (version, set)
with mean@K / pass@K / maj@K, the "eval" row (today's format) from the fit set, a retry that
samples nothing and duplicates no row, and the report's table per set. The tiny model on the
transformers engine, in this process (pipeline.isolation = thread): the shipped warm-started
tiny model at evaluation temperature 0.5, so that samples both pass and fail."""

import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

import runtime.generation as generation
from runtime.evaluation import EVAL_SETS, eval_key, evaluate_version, set_shard_key
from scalerl.config import load_config
from scalerl.prompts import eval_split
from storage import PROMPT_SCHEMA, open_store

EVAL_ROW_COLUMNS = {
    "step",
    "version",
    "compute",
    "time",  # when it was measured: the trackers' clock for the row
    "pass_rate",
    "pass_rate_se",
    "prompts",
    "samples",
    "mean_length",
    "truncation_rate",
    "interruption_rate",
}
SET = (
    "[{name: arith, source: unused.jsonl, samples_per_prompt: 3,"
    " metrics: [mean@k, mean@1, pass@k, pass@2, maj@3]}]"
)


@pytest.fixture(scope="module")
def tiny_model():
    return Path(__file__).resolve().parents[2] / "scalerl/assets/tiny-warm"


@pytest.fixture
def loads(monkeypatch):
    """Engines built (runtime.generation.make_engine, the real one, counted)."""
    generation.close_shared_engines()
    built = []
    real = generation.make_engine

    def counted(*args, **kwargs):
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "make_engine", counted)
    yield built
    generation.close_shared_engines()


def prompts(prefix: str, n: int) -> pa.Table:
    """n prompts of the warm start's distribution (a+b= / a-b=, 1-2 digit operands)."""
    from scalerl.warmstart import task_rows

    rows = [
        {
            "prompt_id": f"{prefix}{i}",
            "prompt": r["prompt"],
            "answer": r["answer"],
            "task": "arithmetic",
        }
        for i, r in enumerate(task_rows(n, seed=len(prefix) + ord(prefix[0])))
    ]
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def make_run(tmp_path, tiny_model, rid, overrides):
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={tmp_path / 'runs'}",
            "pipeline.isolation=thread",
            "evaluation.samples_per_prompt=4",
            "evaluation.temperature=1.0",
            "data.num_eval_prompts=4",
            *overrides,
        ],
    )
    run = open_store(str(tmp_path / "runs")).run(rid, create=True)
    run.write_config(cfg.model_dump(mode="json"))
    run.write_prompts("train", prompts("t", 4))
    if cfg.data.num_eval_prompts:
        run.write_prompts(eval_split("heldout"), prompts("h", 4))
    if cfg.evaluation.sets:
        run.write_prompts(eval_split("arith"), prompts("a", 3))
    run.publish_weights(0, tiny_model)
    return cfg, run


def per_prompt(table) -> dict[str, list[bool]]:
    """passed of each prompt's samples in sample_index order."""
    out: dict[str, list[tuple[int, bool]]] = {}
    for r in table.select(["prompt_id", "sample_index", "passed"]).to_pylist():
        out.setdefault(r["prompt_id"], []).append((r["sample_index"], bool(r["passed"])))
    return {p: [x for _, x in sorted(v)] for p, v in out.items()}


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    return 1 - math.comb(n - c, k) / math.comb(n, k)  # Chen et al. 2021


def majority(table, k: int) -> float:
    """maj@k by Counter: the most common answer of the first k samples (ties: the first seen,
    as Counter.most_common orders them) solves the prompt when its first sample passed."""
    from scalerl.rewards.base import extract_final_answer

    solved = []
    for pid in dict.fromkeys(table.column("prompt_id").to_pylist()):
        rows = sorted(
            (r for r in table.to_pylist() if r["prompt_id"] == pid), key=lambda r: r["sample_index"]
        )[:k]
        answers = [" ".join((extract_final_answer(r["completion"]) or "").split()) for r in rows]
        votes = Counter(a for a in answers if a)
        if not votes:
            solved.append(False)
            continue
        winner = votes.most_common(1)[0][0]
        solved.append(bool(rows[answers.index(winner)]["passed"]))
    return sum(solved) / len(solved)


def test_every_set_is_sampled_with_one_engine_load_and_scored(tmp_path, tiny_model, loads):
    cfg, run = make_run(tmp_path, tiny_model, "sets", [f"evaluation.sets={SET}"])
    row = evaluate_version(cfg, "sets", 0)
    assert len(loads) == 1  # one engine for both sets

    held = run.read_shard("eval", eval_key(0))
    arith = run.read_shard("eval", set_shard_key("arith", 0))
    assert set_shard_key("arith", 0) == "arith-v000000" and eval_key(0) == "v000000"
    assert held.num_rows == 4 * 4 and arith.num_rows == 3 * 3
    assert set(held.column("eval_set").to_pylist()) == {"heldout"}
    assert set(arith.column("eval_set").to_pylist()) == {"arith"}
    assert arith.column("reward_reason").null_count == 0  # scored
    sent = set(arith.column("prompt").to_pylist())  # the rendered prompts, as they are
    assert sent == set(run.read_prompts(eval_split("arith")).column("prompt").to_pylist())

    # "eval": today's row format, from the fit set (heldout): its mean pass rate
    (eval_row,) = run.read_metrics("eval").to_pylist()
    assert set(eval_row) == EVAL_ROW_COLUMNS
    passed = held.column("passed").to_pylist()
    assert eval_row["pass_rate"] == pytest.approx(sum(passed) / len(passed))
    assert eval_row["samples"] == 16 and eval_row["prompts"] == 4
    assert row["pass_rate"] == eval_row["pass_rate"] and set(row["sets"]) == {"heldout", "arith"}

    # "eval_sets": one row per set, metrics recomputed here from the shards
    rows = {r["set"]: r for r in run.read_metrics(EVAL_SETS).to_pylist()}
    assert set(rows) == {"heldout", "arith"}
    h = rows["heldout"]
    assert (h["version"], h["step"], h["samples_per_prompt"], h["prompts"]) == (0, 0, 4, 4)
    by_prompt = per_prompt(held)
    assert h["mean@4"] == pytest.approx(sum(map(sum, by_prompt.values())) / 16)
    assert h["pass@4"] == pytest.approx(
        sum(any(p) for p in by_prompt.values()) / 4  # K = n: any pass
    )
    a = rows["arith"]
    assert (a["samples_per_prompt"], a["prompts"], a["samples"]) == (3, 3, 9)
    by_prompt = per_prompt(arith)
    assert a["mean@3"] == pytest.approx(sum(map(sum, by_prompt.values())) / 9)
    assert a["mean@1"] == pytest.approx(sum(p[0] for p in by_prompt.values()) / 3)
    assert a["pass@2"] == pytest.approx(
        sum(unbiased_pass_at_k(3, sum(p), 2) for p in by_prompt.values()) / 3
    )
    assert a["maj@3"] == pytest.approx(majority(arith, 3))
    # the samples both pass and fail: the checks above are not all zeros
    assert 0 < sum(held.column("passed").to_pylist()) + sum(arith.column("passed").to_pylist()) < 25
    for name in ("mean_length", "truncation_rate", "interruption_rate"):
        assert a[name] is not None

    # a retry: nothing sampled, no commit, no row added
    committed = [(s.key, s.committed_at) for s in run.list_shards("eval")]
    before = {n: run.read_metrics(n, all_rows=True).num_rows for n in ("eval", EVAL_SETS)}
    again = evaluate_version(cfg, "sets", 0)
    assert again["pass_rate"] == row["pass_rate"]
    assert [(s.key, s.committed_at) for s in run.list_shards("eval")] == committed
    assert {n: run.read_metrics(n, all_rows=True).num_rows for n in before} == before
    assert len(loads) == 1

    # the report: a table per set, and the set the fit uses
    from tasks.report import render_report

    text = render_report(
        cfg, "sets", run.url, {}, None, {}, [], run.read_metrics(EVAL_SETS).to_pylist()
    )
    section = text[text.index("## Evaluation sets") :]
    assert "use the set `heldout`" in section
    assert "### `heldout` (fit)" in section and "### `arith`" in section
    arith_part = section[section.index("### `arith`") :]
    assert (
        "| version | compute | prompts | samples_per_prompt | mean@3 | mean@1 | pass@3 | pass@2 | maj@3 |"
        in arith_part
    )
    assert arith_part.count("\n| 0 |") == 1


def test_a_set_added_later_is_sampled_alone_and_the_committed_shard_kept(
    tmp_path, tiny_model, loads
):
    cfg, run = make_run(tmp_path, tiny_model, "later", [])
    evaluate_version(cfg, "later", 0)
    (held,) = run.list_shards("eval")
    # the same run evaluated with a named set as well (e.g. an older run resumed)
    cfg2 = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={tmp_path / 'runs'}",
            "pipeline.isolation=thread",
            "evaluation.samples_per_prompt=4",
            "data.num_eval_prompts=4",
            f"evaluation.sets={SET}",
        ],
    )
    run.write_prompts(eval_split("arith"), prompts("a", 3))
    evaluate_version(cfg2, "later", 0)
    shards = {s.key: s for s in run.list_shards("eval")}
    assert set(shards) == {"v000000", "arith-v000000"}
    assert shards["v000000"].committed_at == held.committed_at  # not sampled again
    assert run.read_metrics("eval").num_rows == 1
    assert sorted(run.read_metrics(EVAL_SETS).column("set").to_pylist()) == ["arith", "heldout"]


def test_a_named_fit_set_feeds_the_eval_row_without_a_heldout_split(tmp_path, tiny_model, loads):
    cfg, run = make_run(
        tmp_path,
        tiny_model,
        "fit",
        [f"evaluation.sets={SET}", "evaluation.fit_set=arith", "data.num_eval_prompts=0"],
    )
    row = evaluate_version(cfg, "fit", 0)
    assert [s.key for s in run.list_shards("eval")] == ["arith-v000000"]
    arith = run.read_shard("eval", "arith-v000000")
    passed = arith.column("passed").to_pylist()
    (eval_row,) = run.read_metrics("eval").to_pylist()
    assert set(eval_row) == EVAL_ROW_COLUMNS
    assert eval_row["pass_rate"] == pytest.approx(sum(passed) / len(passed))
    assert eval_row["samples"] == 9 and row["sets"]["arith"]["mean@3"] == pytest.approx(
        eval_row["pass_rate"]
    )


def test_a_set_without_its_prompt_split_fails_before_any_engine(tmp_path, tiny_model, loads):
    from storage.errors import NotCommittedError

    _, run = make_run(tmp_path, tiny_model, "nosplit", [])
    cfg2 = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={tmp_path / 'runs'}",
            "pipeline.isolation=thread",
            "data.num_eval_prompts=4",
            "evaluation.sets=[{name: other, source: x.jsonl}]",
        ],
    )
    with pytest.raises(
        NotCommittedError, match="evaluation set .other. has no prompts.*eval-other.*Fix"
    ):
        evaluate_version(cfg2, "nosplit", 0)
    assert loads == [] and run.list_shards("eval") == []
