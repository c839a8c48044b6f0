"""scalerl/eval_metrics.py: mean@K, the unbiased pass@K and maj@K, against hand values and a
brute force over every K-subset of the samples."""

import itertools
import math

import pytest

from scalerl.eval_metrics import (
    majority_passed,
    mean_at_k,
    metric_name,
    normalize_answer,
    pass_at_k,
    set_metrics,
)


def brute_pass_at_k(passed: list[bool], k: int) -> float:
    """Share of the k-subsets of the samples that hold at least one pass (the definition the
    unbiased estimator estimates)."""
    subsets = list(itertools.combinations(passed, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs hold the pass
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # only {fail, fail} of 6 misses
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # 1 - C(n-c, k) / C(n, k) written out with math.comb
    assert pass_at_k(16, 5, 4) == pytest.approx(1 - math.comb(11, 4) / math.comb(16, 4))


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_pass_at_k_equals_the_brute_force_over_every_subset(n):
    for c in range(n + 1):
        passed = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(passed, k)), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(8, 0, 3) == 0.0  # no pass: no subset passes
    assert pass_at_k(8, 8, 3) == 1.0  # all pass
    assert pass_at_k(8, 1, 8) == 1.0  # K = n: any pass is in the one subset
    assert pass_at_k(8, 0, 8) == 0.0
    for c in range(9):  # K = 1 is the mean pass rate
        assert pass_at_k(8, c, 1) == pytest.approx(c / 8)
    # large n: the product form stays finite where C(n, k) would be huge
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="Fix"):
        pass_at_k(4, 5, 2)


def test_mean_at_k_takes_the_first_k_samples():
    passed = [True, False, True, True]
    assert mean_at_k(passed, 4) == pytest.approx(3 / 4)
    assert mean_at_k(passed, 2) == pytest.approx(1 / 2)
    assert mean_at_k(passed, 1) == 1.0
    assert mean_at_k(passed, 9) == pytest.approx(3 / 4)  # K clipped to the samples there are


def test_majority_vote_rules():
    # plain majority: "7" twice beats "5" once, and the "7" samples passed
    assert majority_passed(["7", "5", "7"], [True, False, True], 3)
    # the majority is wrong although one sample was right
    assert not majority_passed(["5", "7", "5"], [False, True, False], 3)
    # a tie goes to the answer seen first
    assert majority_passed(["7", "5"], [True, False], 2)
    assert not majority_passed(["5", "7"], [False, True], 2)
    # a sample without an answer does not vote: one "7" beats nothing
    assert majority_passed([None, None, "7"], [False, False, True], 3)
    assert not majority_passed([None, None], [False, False], 2)  # no answer: unsolved
    # only the first K vote: with K = 2 "5" wins the tie; with K = 3 "7" wins
    assert not majority_passed(["5", "7", "7"], [False, True, True], 2)
    assert majority_passed(["5", "7", "7"], [False, True, True], 3)
    # whitespace is normalised before answers are compared
    assert majority_passed(["x +  1", "y", "x + 1 "], [True, False, True], 3)


def test_normalize_answer():
    assert normalize_answer("  a \n  b\t") == "a b"
    assert normalize_answer("   ") is None
    assert normalize_answer(None) is None


def records(prompt_id: str, passed: list[bool], answers: list[str]) -> list[dict]:
    return [
        {
            "prompt_id": prompt_id,
            "sample_index": i,
            "passed": p,
            "completion": f"so the answer is \\boxed{{{a}}}",
            "task": "math",
        }
        for i, (p, a) in enumerate(zip(passed, answers, strict=True))
    ]


def test_set_metrics_average_over_prompts():
    rows = records("a", [True, False, False, False], ["1", "2", "2", "3"]) + records(
        "b", [True, True, False, True], ["4", "4", "5", "4"]
    )
    rows.reverse()  # order of rows does not matter: samples are taken by sample_index
    out = set_metrics(rows, [("mean", 4), ("mean", 2), ("pass", 2), ("pass", 1), ("maj", 4)])
    assert out["mean@4"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert out["mean@2"] == pytest.approx((1 / 2 + 1) / 2)
    # a: n=4, c=1, K=2 -> 1 - C(3,2)/C(4,2) = 0.5; b: c=3 -> 1 - C(1,2)/C(4,2) = 1
    assert out["pass@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["pass@1"] == pytest.approx(out["mean@4"])
    # a: "2" wins (twice) and failed; b: "4" wins and passed
    assert out["maj@4"] == pytest.approx(0.5)
    assert set_metrics([], [("pass", 2)]) == {"pass@2": None}


def test_metric_name():
    assert metric_name("maj", 16) == "maj@16"
    with pytest.raises(ValueError, match="Fix"):
        metric_name("best", 2)
