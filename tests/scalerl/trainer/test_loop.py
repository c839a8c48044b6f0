"""The Trainer loop with in-memory collaborators: metrics, bad input, waiting, NaN, checkpoints."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from scalerl.trainer import NonFiniteLossError, Trainer, TrainerOptions
from scalerl.trainer import loop as loop_module
from scalerl.trainer.checkpoint import read_trainer_state

RUN = "r1"

METRIC_FIELDS = {
    "step", "trained_version", "time", "loss", "grad_norm", "lr", "tokens", "seq_tokens",
    "step_time_s", "tokens_per_s", "wait_s", "micro_batches", "samples_in_batch",
    "samples_offered", "samples_kept", "samples_dropped_stale", "samples_duplicate",
    "samples_filtered_zero_variance", "groups_zero_variance", "advantage_std", "shards_read",
    "shards_rejected", "pass_rate", "reward_mean", "prompt_len_mean", "completion_len_mean",
    "thinking_tokens_mean", "answer_tokens_mean", "truncation_rate", "interruption_rate",
    "nan_steps_total", "newest_generator_version", "steps_ahead", "samples_pending",
    "loss/loss", "loss/tokens", "loss/truncated_fraction", "loss/ratio_mean", "loss/ratio_max",
}  # fmt: skip


def _trainer(kit, model_dir, tmp_path, tables, *, options=None, **cfg):
    (tmp_path / "ck").mkdir(parents=True, exist_ok=True)
    parts = (
        kit.MemorySource(tables),
        kit.MemoryPublisher(),
        kit.MemoryCheckpoints(tmp_path / "ck"),
        kit.MemoryMetrics(),
    )
    opts = options or TrainerOptions(poll_interval_s=0.001, idle_timeout_s=0.01)
    trainer = Trainer(
        kit.tiny_config(model_dir, **cfg),
        run_id=RUN,
        source=parts[0],
        publisher=parts[1],
        checkpoints=parts[2],
        metrics=parts[3],
        options=opts,
    )
    return trainer, parts


def test_every_step_publishes_logs_every_field_and_checkpoints(kit, tiny_model_dir, tmp_path):
    tables = {
        "s0": kit.shard_table(RUN, "s0", [("a", [0]), ("b", [0]), ("z", [0])], G=4),
        "s1": kit.shard_table(RUN, "s1", [("c", [0, 1]), ("d", [1])], G=4),
        "s2": kit.shard_table(RUN, "s2", [("e", [0]), ("f", [2])], G=4),
    }
    # Group z has zero variance: it rides in batch 2 and is filtered there.
    tables["s0"] = tables["s0"].set_column(
        tables["s0"].schema.get_field_index("reward"),
        "reward",
        pa.array([float(i % 2) for i in range(8)] + [1.0] * 4, pa.float32()),
    )
    trainer, (src, pub, ck, met) = _trainer(
        kit, tiny_model_dir, tmp_path, tables, pipeline={"max_off_policy_steps": 1}
    )
    summary = trainer.train()
    assert summary.version == 3 and summary.stop_reason == "idle"
    assert sorted(pub.versions) == [0, 1, 2, 3]
    assert [r["step"] for r in met.rows] == [1, 2, 3]
    for row in met.rows:
        assert set(row) >= METRIC_FIELDS, METRIC_FIELDS - set(row)
        assert {"staleness/0", "staleness/1"} <= set(row)
    first, second, third = met.rows
    assert first["samples_offered"] == 12 and first["staleness/0"] == 8
    assert second["samples_filtered_zero_variance"] == 4 and second["samples_kept"] == 4
    assert second["staleness/1"] == 8  # z (version 0) and c (versions 0..1) at v=1
    # At v=2 with k=1, group e (version 0) is stale: dropped and counted, f is trained.
    assert third["samples_dropped_stale"] == 4
    assert third["staleness/0"] == 4 and third["staleness/1"] == 4  # f (v2), d (v1)
    assert third["pass_rate"] == 0.5 and third["truncation_rate"] == pytest.approx(0.25)
    assert ck.saved == [3]  # checkpoint_every=3; the clean stop does not duplicate it
    state = read_trainer_state(tmp_path / "ck" / "step-3")
    assert state.step == 3 and state.curriculum_version == 7
    assert [e["outcome"] for e in state.ledger] == ["trained"] * 3
    assert state.ledger[2]["stale_groups"] == {"s2": ["e"]}
    assert any(not torch.equal(pub.versions[0][k], pub.versions[3][k]) for k in pub.versions[0])


def test_foreign_shard_is_skipped_counted_and_never_trained(kit, tiny_model_dir, tmp_path):
    tables = {
        "bad": kit.shard_table("other-run", "bad", [("x", [0]), ("y", [0])], G=4),
        "s0": kit.shard_table(RUN, "s0", [("a", [0]), ("b", [0])], G=4),
    }
    trainer, (src, pub, ck, met) = _trainer(kit, tiny_model_dir, tmp_path, tables)
    assert trainer.train().version == 1
    assert met.rows[0]["shards_rejected"] == 1 and met.rows[0]["samples_offered"] == 8
    rejected = trainer.ledger[0]["shards_rejected"]
    assert list(rejected) == ["bad"] and "other-run" in rejected["bad"]
    assert trainer.ledger[0]["groups"] == {"s0": ["a", "b"]}


def test_zero_variance_only_batches_make_no_step_and_the_trainer_waits_with_backoff(
    kit, tiny_model_dir, tmp_path, monkeypatch
):
    flat = [1.0] * 4
    tables = {"s0": kit.shard_table(RUN, "s0", [("a", [0]), ("b", [0])], G=4, rewards=flat)}
    sleeps = []
    monkeypatch.setattr(loop_module.time, "sleep", sleeps.append)
    options = TrainerOptions(
        poll_interval_s=0.5, max_poll_interval_s=4.0, should_stop=lambda: len(sleeps) >= 6
    )
    trainer, (src, pub, ck, met) = _trainer(kit, tiny_model_dir, tmp_path, tables, options=options)
    summary = trainer.train()
    assert summary.version == 0 and summary.stop_reason == "stopped"
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]  # backoff, capped: no hot spin
    assert sorted(pub.versions) == [0] and met.rows == []
    assert [e["outcome"] for e in trainer.ledger] == ["zero_variance"]
    assert ck.saved == [0]  # shutdown checkpoint
    # A later real step reports the filtered completions it carried.
    src.tables["s1"] = kit.shard_table(RUN, "s1", [("c", [0]), ("d", [0])], G=4)
    trainer, (_, _, _, met2) = _trainer(kit, tiny_model_dir, tmp_path / "again", src.tables)
    trainer.train()
    assert met2.rows[0]["samples_filtered_zero_variance"] == 8


def test_nan_steps_are_skipped_then_stop_the_run_with_a_clear_error(kit, tiny_model_dir, tmp_path):
    tables = {}
    for n in range(3):
        t = kit.shard_table(RUN, f"s{n}", [(f"a{n}", [0]), (f"b{n}", [0])], G=4)
        bad = [[float("nan")] * len(x) for x in t["logprobs"].to_pylist()]
        tables[f"s{n}"] = t.set_column(
            t.schema.get_field_index("logprobs"), "logprobs", pa.array(bad, pa.list_(pa.float32()))
        )
    trainer, (src, pub, ck, met) = _trainer(
        kit, tiny_model_dir, tmp_path, tables, trainer={"max_nan_steps": 1}
    )
    with pytest.raises(NonFiniteLossError, match="max_nan_steps = 1"):
        trainer.train()
    assert trainer.nan_steps == 2 and sorted(pub.versions) == [0] and met.rows == []
    assert ck.saved == [0]
    assert read_trainer_state(tmp_path / "ck" / "step-0").nan_steps == 2


class _SlowPublisher:
    """Records each publish with the trainer's step count at its start; sleeps in it."""

    def __init__(self, kit, delay_s: float, fail_at: int | None = None) -> None:
        self.inner, self.delay, self.fail_at = kit.MemoryPublisher(), delay_s, fail_at
        self.hold_until_next: int | None = None
        self.order: list[int] = []
        self.steps_when_done: dict[int, int] = {}
        self.trainer = None

    @property
    def versions(self):
        return self.inner.versions

    def publish(self, version, model, tokenizer, state_dict=None) -> None:
        import time

        if version == self.fail_at:
            raise OSError("disk gone")
        time.sleep(self.delay if version else 0)
        if version == self.hold_until_next and self.trainer is not None:
            # held until the trainer has finished the next step: only a publisher that runs
            # beside the training steps lets it get there (bounded, so a serial one fails)
            deadline = time.monotonic() + 60
            while self.trainer.version <= version and time.monotonic() < deadline:
                time.sleep(0.01)
        self.inner.publish(version, model, tokenizer, state_dict)
        self.order.append(version)
        if self.trainer is not None:
            self.steps_when_done[version] = self.trainer.version

    def latest_version(self):
        return self.inner.latest_version()


def _five_steps(kit):
    return {
        f"s{n}": kit.shard_table(RUN, f"s{n}", [(f"a{n}", [0]), (f"b{n}", [0])], G=4, seed=n)
        for n in range(5)
    }


def test_background_publishing_keeps_order_overlaps_steps_and_checkpoints_wait(
    kit, tiny_model_dir, tmp_path
):
    tables = _five_steps(kit)
    trainer, (src, _, ck, met) = _trainer(
        kit,
        tiny_model_dir,
        tmp_path,
        tables,
        trainer={"checkpoint_every": 2},
        pipeline={"max_off_policy_steps": 8},  # the shards are all from version 0
    )
    slow = trainer.publisher = _SlowPublisher(kit, delay_s=0.3)
    slow.trainer = trainer
    slow.hold_until_next = 1  # deterministic under any load, unlike a race of sleeps
    saved_with = {}
    save = ck.save

    def save_after_publish(step, local_dir):
        saved_with[step] = slow.latest_version()
        save(step, local_dir)

    ck.save = save_after_publish
    assert trainer.train().version == 5
    assert slow.order == [0, 1, 2, 3, 4, 5]  # every version, in order
    # the trainer went on training while a version was being written: some version was
    # committed only after the trainer had finished a later step
    assert any(done > v for v, done in slow.steps_when_done.items() if v)
    # a checkpoint is committed only once its own version is
    assert saved_with and all(saved_with[s] >= s for s in saved_with)
    # the published weights are those of their step, not of a later one: step 5's equal the
    # trainer's final parameters, step 4's do not
    final = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    name = next(iter(final))
    assert torch.equal(slow.versions[5][name], final[name])
    assert not torch.equal(slow.versions[4][name], final[name])


def test_a_failed_background_publish_stops_the_trainer_and_nothing_later_is_published(
    kit, tiny_model_dir, tmp_path
):
    trainer, _ = _trainer(
        kit, tiny_model_dir, tmp_path, _five_steps(kit), pipeline={"max_off_policy_steps": 8}
    )
    slow = trainer.publisher = _SlowPublisher(kit, delay_s=0.0, fail_at=2)
    with pytest.raises(RuntimeError, match="publishing weights failed: OSError: disk gone"):
        trainer.train()
    assert slow.order == [0, 1]


def test_the_background_copy_keeps_tied_weights_one_tensor(tmp_path):
    """A tied LM head shares the embedding: the background publisher's CPU copy must keep
    that, or save_pretrained writes the head a second time (Qwen3-0.6B: 311 MB more per
    version in bf16). Same files as saving the live model."""
    from safetensors import safe_open

    from scalerl.models import build_tiny_model, load_policy

    model, _ = load_policy(str(build_tiny_model(tmp_path / "m", hidden_size=32, heads=1)))
    live = model.state_dict()
    assert live["lm_head.weight"].data_ptr() == live["model.embed_tokens.weight"].data_ptr()
    copy = loop_module.cpu_copy(live)
    assert copy["lm_head.weight"] is copy["model.embed_tokens.weight"]
    assert copy["lm_head.weight"].data_ptr() != live["lm_head.weight"].data_ptr()  # a copy
    model.save_pretrained(tmp_path / "live")
    model.save_pretrained(tmp_path / "copy", state_dict=copy)
    keys = []
    for name in ("live", "copy"):
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            keys.append(sorted(f.keys()))
    assert keys[0] == keys[1] and "lm_head.weight" not in keys[1]
    assert (tmp_path / "copy" / "model.safetensors").stat().st_size == (
        tmp_path / "live" / "model.safetensors"
    ).stat().st_size


def test_a_lora_trainer_trains_only_the_adapters_on_a_frozen_bf16_base(
    kit, tiny_model_dir, tmp_path
):
    """model.lora with model.dtype bfloat16: the base is loaded and kept in bf16 (frozen, never
    changed by a step), the adapters and the fully trained norms are fp32 masters, and every
    published version holds exactly those tensors, each version's differing from the last."""
    from safetensors.torch import load_file

    tables = {
        "s0": kit.shard_table(RUN, "s0", [("a", [0]), ("b", [0])], G=4),
        "s1": kit.shard_table(RUN, "s1", [("c", [1]), ("d", [1])], G=4),
    }
    lora = {"dtype": "bfloat16", "lora.rank": 4, "lora.alpha": 8, "lora.trained_modules": "[norm]"}
    trainer, (_, pub, _, _) = _trainer(kit, tiny_model_dir, tmp_path, tables, model=lora)
    assert trainer.train().version == 2
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    params = dict(trainer.model.named_parameters())
    for name, p in params.items():
        if ".lora_" in name or "norm" in name:
            assert p.dtype == torch.float32, name
        else:  # frozen: the base's bf16 values, untouched by two steps
            assert p.dtype == torch.bfloat16 and not p.requires_grad, name
            key = name.replace(".base_layer.", ".")
            assert torch.equal(p, base[key].to(torch.bfloat16)), name
    lora_keys = {n for n in params if ".lora_" in n}
    norm_keys = {n for n in params if "norm" in n}
    for v in (1, 2):
        assert len(pub.versions[v]) == len(lora_keys) + len(norm_keys)
        assert all(k.startswith("base_model.model.") for k in pub.versions[v])
    changed = [
        k for k in pub.versions[1] if not torch.equal(pub.versions[1][k], pub.versions[2][k])
    ]
    assert any(".lora_B." in k for k in changed) and any("norm" in k for k in changed)
