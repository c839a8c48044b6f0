"""Rollout schema v1: building tables from records and rejecting malformed ones."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from storage import ROLLOUT_SCHEMA, SCHEMA_VERSION, rollouts_from_records, validate_rollouts
from storage.errors import InvalidRolloutsError


def _record(**overrides):
    record = {
        "run_id": "r1",
        "shard_id": "s1",
        "prompt_id": "p1",
        "group_id": "g1",
        "sample_index": 0,
        "task": "arith",
        "prompt": "1+1=",
        "prompt_token_ids": [5, 6],
        "completion": "2",
        "completion_token_ids": [7, 8, 9],
        "logprobs": [-0.5, -0.25, -1.0],
        "versions": [3, 4, 4],
        "finish_reason": "stop",
        "thinking_tokens": 2,
        "answer_tokens": 1,
        "generator_id": "gen0",
        "started_at": 1_767_225_600.0,
        "finished_at": dt.datetime(2026, 1, 1, 0, 0, 5, tzinfo=dt.UTC),
    }
    return record | overrides


def test_schema_has_the_documented_fields():
    assert SCHEMA_VERSION == 1
    assert ROLLOUT_SCHEMA.names == [
        "run_id", "shard_id", "prompt_id", "group_id", "sample_index", "task", "prompt",
        "prompt_token_ids", "answer", "completion", "completion_token_ids", "logprobs",
        "versions", "sampled", "min_version", "max_version", "finish_reason", "thinking_tokens",
        "answer_tokens", "reward", "passed", "reward_reason", "generator_id", "started_at",
        "finished_at",
    ]  # fmt: skip
    assert ROLLOUT_SCHEMA.field("logprobs").type == pa.list_(pa.float32())
    assert ROLLOUT_SCHEMA.field("started_at").type == pa.timestamp("ms", tz="UTC")


def test_records_become_a_valid_table():
    table = rollouts_from_records([_record(), _record(sample_index=1, versions=[1, 5, 2])])
    assert table.schema.equals(ROLLOUT_SCHEMA)
    assert table.column("min_version").to_pylist() == [3, 1]
    assert table.column("max_version").to_pylist() == [4, 5]
    assert table.column("reward").to_pylist() == [None, None]  # filled by the scorer later
    started = table.column("started_at")[0].as_py()
    assert started == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    validate_rollouts(table)


def test_explicit_min_max_version_must_agree():
    with pytest.raises(InvalidRolloutsError, match="'min_version' is 2 in row 0.*gives 3.*Fix: "):
        rollouts_from_records([_record(min_version=2)])


def test_empty_completion_needs_explicit_versions():
    empty = _record(completion="", completion_token_ids=[], logprobs=[], versions=[])
    with pytest.raises(InvalidRolloutsError, match="no versions to compute min_version"):
        rollouts_from_records([empty])
    table = rollouts_from_records([empty | {"min_version": 4, "max_version": 4}])
    assert table.num_rows == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"logprobs": [-0.5]}, "'logprobs' has a different length.*row 1.*Fix: "),
        ({"versions": [1, 1]}, "'versions' has a different length"),
        ({"sampled": [True]}, "'sampled' has a different length"),
        ({"finish_reason": "eos"}, "'finish_reason' holds 'eos'.*Fix: use one of"),
        ({"generator_id": None}, "'generator_id' has 1 null.*Fix: fill"),
        ({"sample_index": "zero"}, "do not fit the rollout schema"),
    ],
)
def test_malformed_records(overrides, message):
    with pytest.raises(InvalidRolloutsError, match=message):
        rollouts_from_records([_record(), _record(**overrides)])


def test_wrong_types_and_missing_columns_are_named():
    table = rollouts_from_records([_record()])
    wrong = table.set_column(
        table.schema.get_field_index("logprobs"), "logprobs",
        pc.cast(table.column("logprobs"), pa.list_(pa.float64())),
    )  # fmt: skip
    with pytest.raises(InvalidRolloutsError, match="'logprobs' has type list<item: double>.*Fix"):
        validate_rollouts(wrong)
    with pytest.raises(InvalidRolloutsError, match=r"lacks column\(s\) \['reward'\]"):
        validate_rollouts(table.drop_columns(["reward"]))
    with pytest.raises(Exception, match="must be a pyarrow.Table"):
        validate_rollouts([_record()])


def test_extra_columns_are_allowed():
    table = rollouts_from_records([_record()])
    validate_rollouts(table.append_column("advantage", pa.array([0.5], pa.float32())))
