"""Advantages against hand-computed numbers and the population-std formula written out here."""

import math

import pytest
import torch

from scalerl.advantages import (
    AdvantageResult,
    compute_advantages,
    group_centered,
    normalize,
    zero_variance_groups,
)

# Three prompts with G = 4 (0/1 rewards): group 0 mixed (1 of 4), group 1 all correct, group 2
# mixed (3 of 4). Ids deliberately non-contiguous and interleaved.
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
GROUPS = [5, 5, 9, 5, 9, 9, 2, 2, 2, 2, 5, 9]
# group 5: rows 0,1,3,10 -> rewards 1,0,0,0  mean 1/4
# group 9: rows 2,4,5,11 -> rewards 1,1,1,1  mean 1 (zero variance)
# group 2: rows 6,7,8,9  -> rewards 0,1,1,1  mean 3/4
CENTERED = [0.75, -0.25, 0.0, -0.25, 0.0, 0.0, -0.75, 0.25, 0.25, 0.25, -0.25, 0.0]


def pop_std(xs):
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


def t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def test_group_centered_hand_numbers():
    a = group_centered(t(REWARDS), torch.tensor(GROUPS))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, t(CENTERED))


def test_zero_variance_groups():
    zv = zero_variance_groups(t(REWARDS), torch.tensor(GROUPS))
    assert zv.tolist() == [g == 9 for g in GROUPS]


def test_batch_std_over_kept_samples():
    keep = [g != 9 for g in GROUPS]
    kept = [a for a, k in zip(CENTERED, keep, strict=True) if k]
    # kept: 0.75, -0.25, -0.25, -0.25 (group 5) and -0.75, 0.25, 0.25, 0.25 (group 2):
    # mean 0, sum of squares 2 * (0.5625 + 3 * 0.0625) = 1.5, population std sqrt(1.5 / 8).
    std = math.sqrt(1.5 / 8)
    assert math.isclose(pop_std(kept), std)
    out, got_std = normalize(t(CENTERED), torch.tensor(GROUPS), "batch", keep=torch.tensor(keep))
    assert math.isclose(got_std, std, rel_tol=1e-6)
    expected = [a / (std + 1e-8) if k else 0.0 for a, k in zip(CENTERED, keep, strict=True)]
    torch.testing.assert_close(out, t(expected))
    # Population std (correction=0), not the unbiased one.
    assert math.isclose(got_std, float(t(kept).std(correction=0)), rel_tol=1e-6)
    assert not math.isclose(got_std, float(t(kept).std(correction=1)), rel_tol=1e-3)


def test_group_normalization_hand_numbers():
    out, _ = normalize(t(CENTERED), torch.tensor(GROUPS), "group")
    # Group 5 (1,0,0,0): centered 0.75,-0.25,-0.25,-0.25, std sqrt(0.1875) = 0.4330.
    # Group 2 mirrors it; group 9 has std 0 and stays 0 (0 / eps), never NaN.
    s = math.sqrt(0.1875)
    expected = [a / (s + 1e-8) for a in CENTERED]
    torch.testing.assert_close(out, t(expected))
    assert math.isclose(float(out[0]), 0.75 / s, rel_tol=1e-6)


def test_none_keeps_centered_values_and_zeroes_dropped():
    keep = torch.tensor([g != 9 for g in GROUPS])
    out, std = normalize(t(CENTERED), torch.tensor(GROUPS), "none", keep=keep)
    torch.testing.assert_close(
        out, t([a if g != 9 else 0.0 for a, g in zip(CENTERED, GROUPS, strict=True)])
    )
    assert math.isclose(std, math.sqrt(1.5 / 8), rel_tol=1e-6)  # still reported for logging


def test_compute_advantages_defaults():
    r = compute_advantages(t(REWARDS), torch.tensor(GROUPS))
    assert isinstance(r, AdvantageResult)
    std = math.sqrt(1.5 / 8)
    expected = [a / (std + 1e-8) if g != 9 else 0.0 for a, g in zip(CENTERED, GROUPS, strict=True)]
    torch.testing.assert_close(r.advantages, t(expected))
    assert r.keep.tolist() == [g != 9 for g in GROUPS]
    assert (r.groups_total, r.groups_zero_variance, r.samples_kept) == (3, 1, 8)
    assert math.isclose(r.std, std, rel_tol=1e-6)
    with pytest.raises(AttributeError):
        r.std = 1.0  # frozen


def test_without_filtering_zero_variance_samples_count_in_std():
    r = compute_advantages(t(REWARDS), torch.tensor(GROUPS), filter_zero_variance=False)
    std = pop_std(CENTERED)  # all 12, including the four zeros of group 9
    assert math.isclose(std, math.sqrt(1.5 / 12))
    assert math.isclose(r.std, std, rel_tol=1e-6)
    assert r.keep.all() and r.samples_kept == 12 and r.groups_zero_variance == 1
    torch.testing.assert_close(r.advantages, t([a / (std + 1e-8) for a in CENTERED]))


def test_plus_minus_one_rewards_behave_like_zero_one():
    pm = [2 * x - 1 for x in REWARDS]
    a01 = compute_advantages(t(REWARDS), torch.tensor(GROUPS))
    apm = compute_advantages(t(pm), torch.tensor(GROUPS))
    assert apm.keep.tolist() == a01.keep.tolist()
    assert apm.groups_zero_variance == a01.groups_zero_variance == 1
    torch.testing.assert_close(apm.advantages, a01.advantages)  # scale cancels in batch std
    assert math.isclose(apm.std, 2 * a01.std, rel_tol=1e-6)
    g = compute_advantages(t(pm), torch.tensor(GROUPS), normalization="group")
    torch.testing.assert_close(
        g.advantages,
        compute_advantages(t(REWARDS), torch.tensor(GROUPS), normalization="group").advantages,
    )
    # Without normalization the -1/+1 advantages are exactly twice the 0/1 ones.
    n01 = compute_advantages(t(REWARDS), torch.tensor(GROUPS), normalization="none")
    npm = compute_advantages(t(pm), torch.tensor(GROUPS), normalization="none")
    torch.testing.assert_close(npm.advantages, 2 * n01.advantages)
    # All-wrong groups are zero-variance under either convention.
    assert zero_variance_groups(
        t([-1.0, -1.0, 1.0, -1.0]), torch.tensor([0, 0, 1, 1])
    ).tolist() == [
        True,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize("normalization", ["batch", "group", "none"])
def test_everything_filtered_gives_zeros_not_nan(normalization):
    r = compute_advantages(
        t([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]), normalization=normalization
    )
    assert torch.isfinite(r.advantages).all() and float(r.advantages.abs().sum()) == 0.0
    assert r.std == 0.0 and r.samples_kept == 0 and r.groups_zero_variance == 2
    assert not r.keep.any()


def test_single_sample_groups_are_zero_variance():
    r = compute_advantages(t([1.0, 0.0, 1.0]), torch.tensor([0, 1, 2]))
    assert r.groups_total == 3 and r.groups_zero_variance == 3 and r.samples_kept == 0


def test_non_binary_rewards():
    rewards, groups = [0.2, 0.5, 0.5, 0.5], [0, 0, 1, 1]
    r = compute_advantages(t(rewards), torch.tensor(groups), normalization="none")
    torch.testing.assert_close(r.advantages, t([-0.15, 0.15, 0.0, 0.0]))
    assert r.groups_zero_variance == 1


def test_bad_inputs_raise_with_fix():
    with pytest.raises(ValueError, match="Fix"):
        compute_advantages(t([1.0, 0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        compute_advantages(t([1.0, 0.0]), t([0.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(t([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="normalization"):
        compute_advantages(t([1.0, 0.0]), torch.tensor([0, 0]), normalization="z")
