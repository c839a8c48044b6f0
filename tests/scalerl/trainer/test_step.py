"""One optimizer step (step.py): exact micro-batching, the loss formula, FP32 head, masking."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from scalerl.models import load_policy
from scalerl.trainer.step import PolicyLogprobs, StepSpec, plan_micro_batches, train_step

RUN = "r1"


def _policy(model_dir, compute_dtype=None, fp32_head=True):
    torch.manual_seed(0)
    model, tok = load_policy(str(model_dir))
    model.train()
    return PolicyLogprobs(model, fp32_head=fp32_head, compute_dtype=compute_dtype), tok


def _batch(kit, groups=(("a", [0]), ("b", [0])), G=4, **kw) -> pa.Table:
    return kit.shard_table(RUN, "s0", list(groups), G=G, **kw)


def _sgd_delta(policy, table, spec, pad_id):
    """Run one step with SGD(lr=1) so the weight change is exactly -gradient."""
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in policy.parameters()]
    out = train_step(policy, opt, sched, table, spec, pad_token_id=pad_id)
    return out, [b - p.detach() for b, p in zip(before, policy.parameters(), strict=True)]


def test_micro_batches_accumulate_to_the_full_batch_gradient_of_the_cispo_formula(
    kit, tiny_model_dir
):
    table = _batch(kit, rewards=[1.0, 0.0, 0.0, 1.0])
    spec_one = StepSpec(micro_batch_tokens=10_000, max_grad_norm=1e9)
    spec_many = StepSpec(micro_batch_tokens=20, max_grad_norm=1e9)
    policy, tok = _policy(tiny_model_dir)
    out_one, grad_one = _sgd_delta(policy, table, spec_one, tok.pad_token_id)
    policy, _ = _policy(tiny_model_dir)
    out_many, grad_many = _sgd_delta(policy, table, spec_many, tok.pad_token_id)
    assert out_one.metrics["micro_batches"] == 1 and out_many.metrics["micro_batches"] > 2
    for a, b in zip(grad_one, grad_many, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    # Reference written out: J = 1/P sum_g [sum_{i in g, t} min(rho, 4) A_i logp_it / sum |y_g|]
    policy, _ = _policy(tiny_model_dir)
    rows = table.to_pylist()
    r = torch.tensor([row["reward"] for row in rows])
    gids = [row["group_id"] for row in rows]
    centered = torch.stack(
        [r[i] - r[[j for j, g in enumerate(gids) if g == gids[i]]].mean() for i in range(len(rows))]
    )
    adv = centered / (centered.std(correction=0) + 1e-8)
    per_group: dict[str, list] = {}
    for i, row in enumerate(rows):
        ids = torch.tensor([row["prompt_token_ids"] + row["completion_token_ids"]])
        hidden = policy.model.base_model(input_ids=ids).last_hidden_state[0].double()
        logp = torch.log_softmax(hidden @ policy.model.lm_head.weight.double().T, -1)
        n_p, c = len(row["prompt_token_ids"]), torch.tensor(row["completion_token_ids"])
        lp = logp[n_p - 1 : n_p - 1 + len(c)].gather(1, c[:, None])[:, 0]
        rho = torch.exp(lp.detach() - torch.tensor(row["logprobs"], dtype=torch.float64))
        per_group.setdefault(gids[i], []).append((rho.clamp(max=4.0) * adv[i] * lp).sum())
        per_group[gids[i]].append(torch.tensor(float(len(c)), dtype=torch.float64))
    terms = [sum(v[0::2]) / sum(v[1::2]) for v in per_group.values()]
    loss_ref = -sum(terms) / len(terms)
    loss_ref.backward()
    assert out_one.metrics["loss"] == pytest.approx(loss_ref.item(), rel=1e-4, abs=1e-6)
    for p, g in zip(policy.parameters(), grad_one, strict=True):
        torch.testing.assert_close(p.grad.float(), g, atol=2e-6, rtol=1e-4)


def _surrogate(policy, table) -> float:
    """-sum_i,t w_it A_i rho_it: the loss whose gradient CISPO follows while rho < eps_max
    (d rho = rho d log pi), prompt-level w, batch-normalized A; written out here."""
    rows = table.to_pylist()
    r = torch.tensor([row["reward"] for row in rows], dtype=torch.float64)
    gids = [row["group_id"] for row in rows]
    same = [[j for j, g in enumerate(gids) if g == gids[i]] for i in range(len(rows))]
    centered = torch.stack([r[i] - r[same[i]].mean() for i in range(len(rows))])
    adv = centered / centered.std(correction=0)
    tokens = {
        g: sum(len(rows[j]["completion_token_ids"]) for j in same[i]) for i, g in enumerate(gids)
    }
    total = 0.0
    with torch.no_grad():
        for i, row in enumerate(rows):
            ids = torch.tensor([row["prompt_token_ids"] + row["completion_token_ids"]])
            hidden = policy.model.base_model(input_ids=ids).last_hidden_state[0].double()
            logp = torch.log_softmax(hidden @ policy.model.lm_head.weight.double().T, -1)
            n_p, c = len(row["prompt_token_ids"]), torch.tensor(row["completion_token_ids"])
            lp = logp[n_p - 1 : n_p - 1 + len(c)].gather(1, c[:, None])[:, 0]
            rho = torch.exp(lp - torch.tensor(row["logprobs"], dtype=torch.float64))
            total -= float((rho * adv[i]).sum()) / tokens[gids[i]] / len(tokens)
    return total


def test_loss_decreases_on_a_fixed_batch(kit, tiny_model_dir):
    from scalerl.config import OptimizerConfig
    from scalerl.trainer.optim import build_optimizer, build_scheduler

    table = _batch(kit, groups=(("a", [0]), ("b", [0]), ("c", [0])))
    policy, tok = _policy(tiny_model_dir)
    opt = build_optimizer(policy.parameters(), OptimizerConfig(lr=1e-3, warmup_steps=0))
    sched = build_scheduler(opt, 0)
    losses = [_surrogate(policy, table)]
    for _ in range(6):
        out = train_step(policy, opt, sched, table, StepSpec(), pad_token_id=tok.pad_token_id)
        assert not out.skipped and math.isfinite(out.metrics["loss"])
        losses.append(_surrogate(policy, table))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


class _DtypeSpy(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.log_softmax_inputs, self.linear_outputs = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.log_softmax, F.log_softmax, torch.Tensor.log_softmax):
            self.log_softmax_inputs.append(args[0].dtype)
        if func is F.linear:
            self.linear_outputs.append(out.dtype)
        return out


@pytest.mark.parametrize("fp32_head", [True, False])
def test_fp32_head_with_a_bf16_body(kit, tiny_model_dir, fp32_head):
    policy, tok = _policy(tiny_model_dir, compute_dtype=torch.bfloat16, fp32_head=fp32_head)
    opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    spy = _DtypeSpy()
    with spy:
        out = train_step(policy, opt, sched, _batch(kit), StepSpec(), pad_token_id=tok.pad_token_id)
    assert not out.skipped
    assert torch.bfloat16 in spy.linear_outputs  # the body ran in bf16
    head = torch.float32 if fp32_head else torch.bfloat16
    assert spy.log_softmax_inputs and set(spy.log_softmax_inputs) == {head}
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # fp32 master weights


def test_injected_tokens_are_masked_out(kit, tiny_model_dir):
    table = _batch(kit)
    lengths = [len(x) for x in table["completion_token_ids"].to_pylist()]
    sampled = [[j % 3 != 1 for j in range(n)] for n in lengths]  # every 3rd token injected
    # Injected tokens have no generator logprob: poison them; they must not reach the loss.
    old = [
        [float("nan") if not s else lp for s, lp in zip(ss, row, strict=True)]
        for ss, row in zip(sampled, table["logprobs"].to_pylist(), strict=True)
    ]
    table = table.set_column(
        table.schema.get_field_index("logprobs"), "logprobs", pa.array(old, pa.list_(pa.float32()))
    )
    column = pa.array(sampled, pa.list_(pa.bool_()))
    if "sampled" in table.column_names:  # rollout schema v1 carries it
        table = table.set_column(table.schema.get_field_index("sampled"), "sampled", column)
    else:
        table = table.append_column("sampled", column)
    policy, tok = _policy(tiny_model_dir)
    opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = train_step(policy, opt, sched, table, StepSpec(), pad_token_id=tok.pad_token_id)
    assert not out.skipped and math.isfinite(out.metrics["loss"])
    assert out.metrics["tokens"] == sum(sum(s) for s in sampled)


def test_nan_loss_skips_the_step_and_leaves_weights_unchanged(kit, tiny_model_dir):
    table = _batch(kit)
    bad = [[float("nan")] * len(x) for x in table["logprobs"].to_pylist()]
    table = table.set_column(
        table.schema.get_field_index("logprobs"), "logprobs", pa.array(bad, pa.list_(pa.float32()))
    )
    policy, tok = _policy(tiny_model_dir)
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = train_step(policy, opt, sched, table, StepSpec(), pad_token_id=tok.pad_token_id)
    assert out.skipped and not out.empty
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    assert sched.last_epoch == 0  # the schedule did not advance either


def test_all_zero_variance_batch_is_empty_and_runs_nothing(kit, tiny_model_dir):
    table = _batch(kit, rewards=[1.0, 1.0, 1.0, 1.0])
    policy, tok = _policy(tiny_model_dir)
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = train_step(policy, opt, sched, table, StepSpec(), pad_token_id=tok.pad_token_id)
    assert out.empty and out.metrics["samples_filtered_zero_variance"] == 8
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_plan_micro_batches_covers_every_row_once_within_budget():
    lengths = [5, 30, 12, 12, 7, 1, 50, 3]
    rows = [0, 1, 2, 3, 4, 6, 7]  # row 5 filtered out
    plan = plan_micro_batches(lengths, rows, budget=36)
    assert sorted(i for mb in plan for i in mb) == rows
    for mb in plan:
        assert len(mb) == 1 or len(mb) * max(lengths[i] for i in mb) <= 36
    assert [6] in plan  # longer than the budget: alone


def test_rows_the_filter_stage_marked_unusable_stay_out_of_advantages_and_loss(kit, tiny_model_dir):
    # Group a: row 0 has NaN generator logprobs (filter_reason nonfinite_logprobs); rows 1-3
    # have rewards 1, 0, 1 -> still a mixed group. Group b: rewards 0,1,0,1.
    table = _batch(kit, rewards=[0.0, 1.0, 0.0, 1.0])
    rewards = [1.0, 1.0, 0.0, 1.0] + [0.0, 1.0, 0.0, 1.0]
    logprobs = table["logprobs"].to_pylist()
    logprobs[0] = [float("nan")] * len(logprobs[0])
    reasons = ["nonfinite_logprobs"] + [None] * 7
    table = (
        table.set_column(
            table.schema.get_field_index("logprobs"),
            "logprobs",
            pa.array(logprobs, pa.list_(pa.float32())),
        )
        .set_column(
            table.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float32())
        )
        .append_column("filter_reason", pa.array(reasons, pa.string()))
    )
    policy, tok = _policy(tiny_model_dir)
    opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = train_step(policy, opt, sched, table, StepSpec(), pad_token_id=tok.pad_token_id)
    assert not out.skipped and math.isfinite(out.metrics["loss"])
    assert out.metrics["samples_unusable"] == 1 and out.metrics["samples_kept"] == 7
    # Batch std over the 7 usable centered rewards (group a without row 0: mean 2/3).
    centered = torch.tensor([1 / 3, -2 / 3, 1 / 3, -0.5, 0.5, -0.5, 0.5])
    assert out.metrics["advantage_std"] == pytest.approx(float(centered.std(correction=0)))


def test_gradient_checkpointing_gives_the_same_step(kit, tiny_model_dir):
    table = _batch(kit)
    spec = StepSpec(micro_batch_tokens=64, max_grad_norm=1e9)
    policy, tok = _policy(tiny_model_dir)
    _, plain = _sgd_delta(policy, table, spec, tok.pad_token_id)
    policy, _ = _policy(tiny_model_dir)
    policy.model.gradient_checkpointing_enable()
    _, recomputed = _sgd_delta(policy, table, spec, tok.pad_token_id)
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
