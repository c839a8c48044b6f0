"""Losses against their formulas written out here with plain Python arithmetic, plus autograd,
clipping, micro-batching and registry checks."""

import math

import pytest
import torch

from scalerl.losses import LOSSES, cispo_loss, compute_loss, dapo_loss, grpo_loss, gspo_loss
from scalerl.losses.aggregation import token_weights

MODES = ["prompt", "sample", "token"]
MASK = [
    [1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0],
    [1, 0, 0, 0, 0],
    [1, 1, 1, 1, 0],
    [1, 1, 0, 0, 0],
    [0, 0, 0, 0, 0],  # empty completion, alone in group 2: counts as neither sample nor prompt
]
GROUPS = [0, 0, 0, 1, 1, 2]
ADV = [0.5, -1.0, 1.5, 0.7, -0.7, 2.0]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    lp = -2.0 * torch.rand(6, 5, generator=g)
    old = lp + 0.8 * torch.randn(6, 5, generator=g)
    old[0, 1] = lp[0, 1] - 2.0  # rho = e^2 > 4: truncated by CISPO's default eps_max
    return lp, old


def aggregate(token_losses, mask, groups, mode):
    """The aggregation modes as stated: plain means over tokens / samples / prompts."""
    rows = [
        [x for x, m in zip(tl, mr, strict=True) if m]
        for tl, mr in zip(token_losses, mask, strict=True)
    ]
    if mode == "token":
        flat = [x for r in rows for x in r]
        return sum(flat) / len(flat)
    if mode == "sample":
        per_sample = [sum(r) / len(r) for r in rows if r]
        return sum(per_sample) / len(per_sample)
    per_prompt = []
    for g in dict.fromkeys(groups):
        toks = [x for r, gi in zip(rows, groups, strict=True) if gi == g for x in r]
        if toks:
            per_prompt.append(sum(toks) / len(toks))
    return sum(per_prompt) / len(per_prompt)


def ref_weights(mask, groups, mode):
    """w_it such that aggregate(...) = sum w_it * token_loss_it."""
    lengths = [sum(r) for r in mask]
    if mode == "token":
        return [[m / sum(lengths) for m in r] for r in mask]
    if mode == "sample":
        n = sum(1 for n_i in lengths if n_i)
        return [
            [m / (n_i * n) if m else 0.0 for m in r] for r, n_i in zip(mask, lengths, strict=True)
        ]
    tokens = {
        g: sum(n_i for n_i, gj in zip(lengths, groups, strict=True) if gj == g) for g in groups
    }
    n_prompts = sum(1 for v in tokens.values() if v)
    return [
        [m / (tokens[g] * n_prompts) if m else 0.0 for m in r]
        for r, g in zip(mask, groups, strict=True)
    ]


def call(fn, lp, old, mode=None, **kw):
    if mode is not None:
        kw["aggregation"] = mode
    return fn(lp, old, torch.tensor(ADV), torch.tensor(MASK).bool(), torch.tensor(GROUPS), **kw)


def clip(x, lo, hi):
    return max(lo, min(hi, x))


# ---------------------------------------------------------------- values vs formulas


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eps_max", [4.0, 1.2, 100.0])
def test_cispo_value(batch, mode, eps_max):
    lp, old = batch
    lps, olds = lp.tolist(), old.tolist()
    token_losses = [
        [-min(math.exp(lps[i][t] - olds[i][t]), eps_max) * ADV[i] * lps[i][t] for t in range(5)]
        for i in range(6)
    ]
    loss, metrics = call(cispo_loss, lp, old, mode, eps_max=eps_max)
    assert math.isclose(loss.item(), aggregate(token_losses, MASK, GROUPS, mode), rel_tol=1e-5)
    ratios = [math.exp(lps[i][t] - olds[i][t]) for i in range(6) for t in range(5) if MASK[i][t]]
    assert metrics["tokens"] == len(ratios) == 15
    assert math.isclose(metrics["ratio_mean"], sum(ratios) / 15, rel_tol=1e-5)
    assert math.isclose(metrics["ratio_max"], max(ratios), rel_tol=1e-5)
    assert metrics["truncated_fraction"] == pytest.approx(sum(r > eps_max for r in ratios) / 15)
    assert (metrics["truncated_fraction"] > 0) == (eps_max < max(ratios))
    assert math.isclose(metrics["loss"], loss.item(), rel_tol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("fn", "lo", "hi"), [(grpo_loss, 0.2, 0.2), (dapo_loss, 0.2, 0.28)])
def test_clipped_surrogate_value(batch, mode, fn, lo, hi):
    lp, old = batch
    lps, olds = lp.tolist(), old.tolist()
    token_losses = []
    for i in range(6):
        row = []
        for t in range(5):
            rho = math.exp(lps[i][t] - olds[i][t])
            row.append(-min(rho * ADV[i], clip(rho, 1 - lo, 1 + hi) * ADV[i]))
        token_losses.append(row)
    kw = {"eps": lo} if fn is grpo_loss else {"eps_low": lo, "eps_high": hi}
    loss, metrics = call(fn, lp, old, mode, **kw)
    assert math.isclose(loss.item(), aggregate(token_losses, MASK, GROUPS, mode), rel_tol=1e-5)
    n_high = n_low = 0
    for i in range(6):
        for t in range(5):
            rho = math.exp(lps[i][t] - olds[i][t])
            if MASK[i][t]:
                n_high += ADV[i] > 0 and rho > 1 + hi
                n_low += ADV[i] < 0 and rho < 1 - lo
    assert n_high > 0 and n_low > 0
    assert metrics["clip_high_fraction"] == pytest.approx(n_high / 15)
    assert metrics["clip_low_fraction"] == pytest.approx(n_low / 15)
    assert metrics["clip_fraction"] == pytest.approx((n_high + n_low) / 15)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("lo", "hi"), [(3e-4, 4e-4), (0.3, 0.4)])
def test_gspo_value(batch, mode, lo, hi):
    lp, old = batch
    lps, olds = lp.tolist(), old.tolist()
    token_losses, seq_ratios = [], []
    for i in range(6):
        n_i = sum(MASK[i])
        log_s = sum(lps[i][t] - olds[i][t] for t in range(5) if MASK[i][t]) / max(n_i, 1)
        s = math.exp(log_s)
        if n_i:
            seq_ratios.append(s)
        seq_loss = -min(s * ADV[i], clip(s, 1 - lo, 1 + hi) * ADV[i])
        token_losses.append([seq_loss] * 5)
    loss, metrics = call(gspo_loss, lp, old, mode, eps_low=lo, eps_high=hi)
    assert math.isclose(loss.item(), aggregate(token_losses, MASK, GROUPS, mode), rel_tol=1e-5)
    assert metrics["samples"] == 5 and metrics["tokens"] == 15
    assert math.isclose(metrics["seq_ratio_mean"], sum(seq_ratios) / 5, rel_tol=1e-5)
    assert math.isclose(metrics["seq_ratio_max"], max(seq_ratios), rel_tol=1e-5)
    assert math.isclose(metrics["seq_ratio_min"], min(seq_ratios), rel_tol=1e-5)


def test_gspo_sample_mode_equals_sequence_objective_in_value_and_gradient(batch):
    lp, old = batch
    lo, hi = 0.05, 0.08
    mask = torch.tensor(MASK).bool()
    adv = torch.tensor(ADV)
    # GSPO written at the sequence level: J = 1/N sum_i min(s_i A_i, clip(s_i) A_i).
    lp_ref = lp.clone().requires_grad_(True)
    terms = []
    for i in range(6):
        n_i = int(mask[i].sum())
        if n_i == 0:
            continue
        s_i = torch.exp((lp_ref[i][mask[i]] - old[i][mask[i]]).sum() / n_i)
        terms.append(torch.minimum(s_i * adv[i], s_i.clamp(1 - lo, 1 + hi) * adv[i]))
    ref = -torch.stack(terms).mean()
    ref.backward()
    lp_ours = lp.clone().requires_grad_(True)
    loss, metrics = call(gspo_loss, lp_ours, old, "sample", eps_low=lo, eps_high=hi)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(lp_ours.grad, lp_ref.grad)
    assert 0 < metrics["clip_fraction"] < 1


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("mode", MODES)
def test_cispo_gradient_is_truncated_ratio_times_advantage_times_weight(batch, mode):
    lp, old = batch
    eps_max = 4.0
    lp = lp.clone().requires_grad_(True)
    old = old.clone().requires_grad_(True)
    loss, _ = call(cispo_loss, lp, old, mode, eps_max=eps_max)
    loss.backward()
    w = ref_weights(MASK, GROUPS, mode)
    lps, olds = lp.tolist(), old.tolist()
    expected = [
        [-min(math.exp(lps[i][t] - olds[i][t]), eps_max) * ADV[i] * w[i][t] for t in range(5)]
        for i in range(6)
    ]
    torch.testing.assert_close(lp.grad, torch.tensor(expected))
    # The truncated token (rho = e^2 > eps_max) still gets gradient -eps_max * A * w.
    assert math.isclose(float(lp.grad[0, 1]), -eps_max * ADV[0] * w[0][1], rel_tol=1e-5)
    assert old.grad is None


def test_cispo_ratio_carries_no_gradient(batch):
    lp, old = batch
    mask = torch.tensor(MASK).bool()
    w = torch.tensor(ref_weights(MASK, GROUPS, "prompt"))
    adv = torch.tensor(ADV)[:, None]

    def grad_of(make_loss):
        x = lp.clone().requires_grad_(True)
        make_loss(x).backward()
        return x.grad

    ours = grad_of(lambda x: call(cispo_loss, x, old, "prompt")[0])
    detached = grad_of(lambda x: -(w * torch.exp(x.detach() - old).clamp(max=4.0) * adv * x).sum())
    with_ratio_grad = grad_of(lambda x: -(w * torch.exp(x - old).clamp(max=4.0) * adv * x).sum())
    torch.testing.assert_close(ours, detached)
    assert not torch.allclose(ours[mask], with_ratio_grad[mask])


@pytest.mark.parametrize(("fn", "kw"), [(grpo_loss, {"eps": 0.2}), (dapo_loss, {"eps_high": 0.28})])
def test_clipping_on_both_sides(fn, kw):
    # Row 0 has A = +1, row 1 has A = -1; ratios 0.5, 0.75, 1.25, 1.5 (old log-probs = 0).
    rhos = [0.5, 0.75, 1.25, 1.5]
    lp = torch.tensor([[math.log(r) for r in rhos]] * 2, requires_grad=True)
    old = torch.zeros(2, 4)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss, metrics = fn(lp, old, adv, mask, torch.tensor([0, 1]), aggregation="token", **kw)
    loss.backward()
    hi = 1 + kw.get("eps", kw.get("eps_high"))
    lo = 0.8
    expected_loss, expected_grad = 0.0, []
    for a in (1.0, -1.0):
        row = []
        for r in rhos:
            clipped = (a > 0 and r > hi) or (a < 0 and r < lo)
            expected_loss += -min(r * a, clip(r, lo, hi) * a) / 8
            row.append(0.0 if clipped else -a * r / 8)  # d(-rho A / 8)/d logprob = -rho A / 8
        expected_grad.append(row)
    assert math.isclose(loss.item(), expected_loss, rel_tol=1e-6)
    torch.testing.assert_close(lp.grad, torch.tensor(expected_grad))
    # A>0: rho 1.5 (and 1.25 under GRPO) clipped above; A<0: rho 0.5, 0.75 clipped below.
    n_high = 2 if hi < 1.25 else 1
    assert metrics["clip_high_fraction"] == pytest.approx(n_high / 8)
    assert metrics["clip_low_fraction"] == pytest.approx(2 / 8)


def test_gspo_clips_whole_sequence():
    # Sequence ratio exp(mean(log ratios)) = exp(0.3) > 1 + eps_high: every token's gradient is 0.
    lp = torch.tensor([[0.1, 0.5, 0.3], [0.1, 0.5, 0.3]], requires_grad=True)
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = gspo_loss(
        lp, old, adv, torch.ones(2, 3, dtype=torch.bool), torch.tensor([0, 0])
    )
    loss.backward()
    s = math.exp(0.3)
    assert math.isclose(metrics["seq_ratio_max"], s, rel_tol=1e-6)
    assert lp.grad[0].abs().sum() == 0  # A > 0, s above 1 + 4e-4: clipped
    # A < 0 and s > 1: unclipped; each token gets -A * s / (N * |y|) = s / 6.
    torch.testing.assert_close(lp.grad[1], torch.full((3,), s / 6))
    assert metrics["clip_fraction"] == 0.5
    assert math.isclose(loss.item(), (-(1 + 4e-4) * 1.0 + s) / 2, rel_tol=1e-6)


# ---------------------------------------------------------------- micro-batching, padding


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_full_batch_weights_are_exact(batch, name, mode):
    lp, old = batch
    mask = torch.tensor(MASK).bool()
    groups, adv = torch.tensor(GROUPS), torch.tensor(ADV)
    kw = {"eps_low": 0.1, "eps_high": 0.2} if name == "gspo" else {}
    full_x = lp.clone().requires_grad_(True)
    full, _ = compute_loss(
        name, logprobs=full_x, old_logprobs=old, advantages=adv, mask=mask, group_ids=groups,
        aggregation=mode, **kw,
    )  # fmt: skip
    full.backward()
    w = token_weights(mask, groups, mode)
    micro_x = lp.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        part, _ = compute_loss(
            name, logprobs=micro_x[rows], old_logprobs=old[rows], advantages=adv[rows],
            mask=mask[rows], group_ids=groups[rows], aggregation=mode, weights=w[rows], **kw,
        )  # fmt: skip
        part.backward()
        total += part.item()
    assert math.isclose(total, full.item(), rel_tol=1e-5, abs_tol=1e-7)
    torch.testing.assert_close(micro_x.grad, full_x.grad)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_garbage_old_logprobs_off_the_mask_do_not_leak(batch, name):
    lp, old = batch
    mask = torch.tensor(MASK).bool()
    dirty = old.masked_fill(~mask, float("nan"))
    clean = old.masked_fill(~mask, 0.0)
    args = {"advantages": torch.tensor(ADV), "mask": mask, "group_ids": torch.tensor(GROUPS)}
    loss_dirty, m_dirty = compute_loss(name, logprobs=lp, old_logprobs=dirty, **args)
    loss_clean, m_clean = compute_loss(name, logprobs=lp, old_logprobs=clean, **args)
    assert torch.isfinite(loss_dirty)
    assert loss_dirty.item() == loss_clean.item()
    assert m_dirty == m_clean


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_empty_batch_is_zero_not_nan(name):
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = compute_loss(
        name, logprobs=lp, old_logprobs=torch.zeros(2, 3), advantages=torch.ones(2),
        mask=torch.zeros(2, 3, dtype=torch.bool), group_ids=torch.tensor([0, 1]),
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and metrics["tokens"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values())
    assert float(lp.grad.abs().sum()) == 0.0


# ---------------------------------------------------------------- registry and input errors


def test_registry_and_defaults(batch):
    lp, old = batch
    assert set(LOSSES) == {"cispo", "grpo", "dapo", "gspo"}
    a, _ = call(cispo_loss, lp, old)
    b, _ = call(cispo_loss, lp, old, "prompt", eps_max=4.0)
    assert a.item() == b.item()  # CISPO defaults: prompt aggregation, eps_max 4
    kwargs = {
        "logprobs": lp, "old_logprobs": old, "advantages": torch.tensor(ADV),
        "mask": torch.tensor(MASK).bool(), "group_ids": torch.tensor(GROUPS),
    }  # fmt: skip
    assert compute_loss("grpo", **kwargs)[0].item() == call(grpo_loss, lp, old)[0].item()
    with pytest.raises(ValueError, match="cispo, dapo, grpo, gspo"):
        compute_loss("ppo", **kwargs)


def test_bad_inputs_raise_with_fix(batch):
    lp, old = batch
    mask, groups, adv = torch.tensor(MASK).bool(), torch.tensor(GROUPS), torch.tensor(ADV)
    with pytest.raises(ValueError, match="old_logprobs.*Fix"):
        cispo_loss(lp, old[:, :3], adv, mask, groups)
    with pytest.raises(ValueError, match="advantages.*Fix"):
        cispo_loss(lp, old, adv[:3], mask, groups)
    with pytest.raises(ValueError, match="weights.*Fix"):
        cispo_loss(lp, old, adv, mask, groups, weights=torch.ones(6, 4))
    with pytest.raises(ValueError, match="aggregation"):
        cispo_loss(lp, old, adv, mask, groups, aggregation="mean")
    with pytest.raises(ValueError, match="eps_max"):
        cispo_loss(lp, old, adv, mask, groups, eps_max=0.0)
    with pytest.raises(ValueError, match="eps_low"):
        grpo_loss(lp, old, adv, mask, groups, eps=1.5)
