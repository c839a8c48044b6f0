"""token_weights against the aggregation formulas written out here with plain Python loops."""

import math

import pytest
import torch

from scalerl.losses.aggregation import token_weights

MASK = [
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 1],
    [1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],  # empty row: neither a sample nor (alone) a prompt
    [1, 1, 0, 0, 0, 0],
]
GROUPS = [7, 7, 3, 3, 11]


def ref_weights(mask, groups, mode):
    lengths = [sum(row) for row in mask]
    if mode == "token":
        total = sum(lengths)
        return [[m / total for m in row] for row in mask]
    if mode == "sample":
        n = sum(1 for n_i in lengths if n_i > 0)
        return [
            [m / (n_i * n) if m else 0.0 for m in row]
            for row, n_i in zip(mask, lengths, strict=True)
        ]
    group_tokens = {}
    for g, n_i in zip(groups, lengths, strict=True):
        group_tokens[g] = group_tokens.get(g, 0) + n_i
    n_prompts = sum(1 for s in group_tokens.values() if s > 0)
    return [
        [m / (group_tokens[g] * n_prompts) if m else 0.0 for m in row]
        for row, g in zip(mask, groups, strict=True)
    ]


@pytest.mark.parametrize("mode", ["prompt", "sample", "token"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_weights_match_formula(mode, mask_dtype):
    mask = torch.tensor(MASK).to(mask_dtype)
    w = token_weights(mask, torch.tensor(GROUPS), mode)
    assert mask.tolist() == MASK  # the caller's mask is not modified
    assert w.shape == mask.shape
    torch.testing.assert_close(w, torch.tensor(ref_weights(MASK, GROUPS, mode)))
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)


def test_hand_numbers_prompt_mode():
    # group 7: 3 + 6 = 9 tokens; group 3: 1 token; group 11: 2 tokens; 3 prompts.
    w = token_weights(torch.tensor(MASK), torch.tensor(GROUPS), "prompt")
    assert math.isclose(float(w[0, 0]), 1 / 27, rel_tol=1e-6)
    assert math.isclose(float(w[1, 5]), 1 / 27, rel_tol=1e-6)
    assert math.isclose(float(w[2, 0]), 1 / 3, rel_tol=1e-6)
    assert math.isclose(float(w[4, 1]), 1 / 6, rel_tol=1e-6)
    assert float(w[3].abs().sum()) == 0.0
    assert float(w[0, 3]) == 0.0


def test_prompt_level_gives_each_prompt_equal_share():
    # Prompt 0: two completions of 100 tokens; prompt 1: two completions of 2 and 3 tokens.
    mask = torch.zeros(4, 100, dtype=torch.bool)
    mask[0:2, :] = True
    mask[2, :2] = True
    mask[3, :3] = True
    groups = torch.tensor([0, 0, 1, 1])
    w = token_weights(mask, groups, "prompt")
    assert math.isclose(float(w[:2].sum()), 0.5, rel_tol=1e-6)
    assert math.isclose(float(w[2:].sum()), 0.5, rel_tol=1e-6)
    # Token averaging would give the long prompt 200/205 of the weight instead.
    w_tok = token_weights(mask, groups, "token")
    assert math.isclose(float(w_tok[:2].sum()), 200 / 205, rel_tol=1e-6)
    # Sample averaging gives every completion 1/4.
    w_s = token_weights(mask, groups, "sample")
    for i in range(4):
        assert math.isclose(float(w_s[i].sum()), 0.25, rel_tol=1e-6)


def test_keep_drops_rows_and_prompts():
    mask = torch.tensor(MASK)
    keep = torch.tensor([True, True, False, True, True])  # drops group 3 entirely (row 3 is empty)
    w = token_weights(mask, torch.tensor(GROUPS), "prompt", keep=keep)
    kept_mask = [row if k else [0] * len(row) for row, k in zip(MASK, keep.tolist(), strict=True)]
    torch.testing.assert_close(w, torch.tensor(ref_weights(kept_mask, GROUPS, "prompt")))
    assert math.isclose(float(w[:2].sum()), 0.5, rel_tol=1e-6)  # two prompts left


@pytest.mark.parametrize("mode", ["prompt", "sample", "token"])
def test_empty_batch_gives_zero_not_nan(mode):
    w = token_weights(torch.zeros(3, 5, dtype=torch.bool), torch.tensor([0, 0, 1]), mode)
    assert torch.isfinite(w).all()
    assert float(w.abs().sum()) == 0.0


def test_arbitrary_group_ids_are_fine():
    mask = torch.tensor(MASK)
    remapped = torch.tensor([-5, -5, 10**12, 10**12, 0])
    torch.testing.assert_close(
        token_weights(mask, remapped, "prompt"), token_weights(mask, torch.tensor(GROUPS), "prompt")
    )


def test_bad_inputs_raise_with_fix():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="Fix"):
        token_weights(mask, torch.tensor([0, 0]), "mean")
    with pytest.raises(ValueError, match="group_ids"):
        token_weights(mask, torch.tensor([0, 0, 1]), "prompt")
    with pytest.raises(ValueError, match="integer"):
        token_weights(mask, torch.tensor([0.0, 1.0]), "prompt")
    with pytest.raises(ValueError, match="mask"):
        token_weights(torch.ones(3, dtype=torch.bool), torch.tensor([0, 0, 1]), "prompt")
    with pytest.raises(ValueError, match="keep"):
        token_weights(mask, torch.tensor([0, 0]), "prompt", keep=torch.tensor([True]))
