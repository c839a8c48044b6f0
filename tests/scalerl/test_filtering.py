"""filter_reasons: annotations checked by hand on a small table."""

import math

import pyarrow as pa

from scalerl.filtering import filter_reasons


def _table(groups, rewards, lengths, bad_logprob_rows=()):
    logprobs = [[(math.nan if i in bad_logprob_rows else -0.5)] * n for i, n in enumerate(lengths)]
    return pa.table(
        {
            "group_id": groups,
            "reward": pa.array(rewards, pa.float32()),
            "completion_token_ids": [[1] * n for n in lengths],
            "logprobs": pa.array(logprobs, pa.list_(pa.float32())),
        }
    )


def test_zero_variance_groups_are_marked_not_dropped():
    # g0: rewards 1,1 -> zero variance; g1: 0,1 -> kept; g2: -1,-1 -> zero variance (+-1 convention)
    table = _table(["g0", "g0", "g1", "g1", "g2", "g2"], [1, 1, 0, 1, -1, -1], [3, 3, 3, 3, 3, 3])
    out, counts = filter_reasons(table)
    assert out.num_rows == 6
    assert (
        out.column("filter_reason").to_pylist()
        == ["zero_variance"] * 2 + [None, None] + ["zero_variance"] * 2
    )
    assert counts == {
        "rows": 6,
        "kept": 2,
        "no_tokens": 0,
        "nonfinite_logprobs": 0,
        "zero_variance": 4,
    }


def test_unusable_rows_are_marked_first_and_leave_the_rest_of_the_group():
    # g0: row 0 has no tokens; the remaining rows (rewards 0 and 1) still vary -> kept.
    # g1: row 4 has a NaN logprob; the remaining rows 3 and 5 both scored 1 -> zero variance.
    table = _table(
        ["g0", "g0", "g0", "g1", "g1", "g1"],
        [1, 0, 1, 1, 0, 1],
        [0, 2, 2, 2, 2, 2],
        bad_logprob_rows=(4,),
    )
    out, counts = filter_reasons(table)
    assert out.column("filter_reason").to_pylist() == [
        "no_tokens",
        None,
        None,
        "zero_variance",
        "nonfinite_logprobs",
        "zero_variance",
    ]
    assert counts["kept"] == 2


def test_filter_off_keeps_zero_variance_rows_and_is_idempotent():
    table = _table(["g0", "g0"], [1, 1], [2, 2])
    out, counts = filter_reasons(table, zero_variance=False)
    assert out.column("filter_reason").to_pylist() == [None, None]
    again, _ = filter_reasons(out, zero_variance=False)
    assert again.column_names.count("filter_reason") == 1
