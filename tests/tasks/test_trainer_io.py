"""runtime/trainer_io.py: the trainer's Protocols over a real (local) run store."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from runtime.trainer_io import TrainerIO
from scalerl.config import load_config
from scalerl.models import build_tiny_model, load_policy
from scalerl.trainer import ShardRejected, Trainer, TrainerOptions
from storage import open_store, rollouts_from_records

RUN = "io-run"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", hidden_size=64, heads=1)


def _shard(key: str, groups: list[str], run_id: str = RUN, G: int = 4) -> pa.Table:
    rng, rows = random.Random(key), []
    for gid in groups:
        prompt = [rng.randrange(10, 100) for _ in range(5)]
        for i in range(G):
            n = rng.randint(2, 8)
            rows.append(
                {
                    "run_id": run_id, "shard_id": key, "prompt_id": gid, "group_id": gid,
                    "sample_index": i, "task": "arithmetic", "prompt": "p" * 5,
                    "prompt_token_ids": prompt, "answer": "1", "completion": "c" * n,
                    "completion_token_ids": [rng.randrange(10, 100) for _ in range(n)],
                    "logprobs": [-4.5] * n, "versions": [0] * n, "finish_reason": "stop",
                    "thinking_tokens": n, "answer_tokens": 0, "reward": float(i % 2),
                    "passed": bool(i % 2), "generator_id": "g0",
                    "started_at": 1.7e9, "finished_at": 1.7e9,
                }
            )  # fmt: skip
    return rollouts_from_records(rows)


def _config(model_dir: Path, **extra):
    items = [
        f"model.name_or_path={model_dir}", "model.dtype=float32",
        "generation.prompts_per_batch=2", "generation.samples_per_prompt=4",
        "optimizer.lr=0.001", "optimizer.warmup_steps=0", "trainer.micro_batch_tokens=64",
        "trainer.checkpoint_every=3", "schedule.max_steps=3", "pipeline.max_off_policy_steps=8",
    ] + [f"{k}={v}" for k, v in extra.items()]  # fmt: skip
    return load_config(preset="tiny-cpu", overrides=items)


def _make_other_schema_version(run, key: str) -> None:
    """Rewrite a committed shard as if a future release (schema v2) had written it."""
    record_path = Path(run.url) / "shards" / "filtered" / "commits" / f"{key}.json"
    record = json.loads(record_path.read_text())
    data_path = record_path.parent.parent / record["data"]
    table = pq.read_table(data_path)
    meta = {**table.schema.metadata, b"scalerl.schema_version": b"2"}
    pq.write_table(table.replace_schema_metadata(meta), data_path, compression="zstd")
    data = data_path.read_bytes()
    record["bytes"] = len(data)
    if "crc32" in record:
        record["crc32"] = zlib.crc32(data)
    if "sha256" in record:
        record["sha256"] = hashlib.sha256(data).hexdigest()
    record_path.write_text(json.dumps(record))


def test_trainer_over_a_run_store(model_dir, tmp_path):
    run = open_store(str(tmp_path / "store")).run(RUN, create=True)
    run.commit_shard("filtered", "s0", _shard("s0", ["a", "b"]))
    run.commit_shard("filtered", "s1", _shard("s1", ["c", "d"]))
    run.commit_shard("filtered", "s2", _shard("s2", ["e", "f", "g"]))
    _make_other_schema_version(run, "s1")
    io = TrainerIO.over(run, stage="filtered", weights_dtype="float32")
    assert io.source.list_ready() == ["s0", "s1", "s2"]

    trainer = Trainer(
        _config(model_dir),
        run_id=RUN,
        source=io.source,
        publisher=io.publisher,
        checkpoints=io.checkpoints,
        metrics=io.metrics,
        options=TrainerOptions(poll_interval_s=0.01, idle_timeout_s=0.05),
    )
    summary = trainer.train()
    assert summary.version == 2 and summary.stop_reason == "idle"
    assert run.list_weight_versions() == [0, 1, 2]
    metrics = run.read_metrics("trainer").to_pylist()
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[1]["shards_rejected"] == 1  # s1: read for step 2, skipped, never trained
    assert "SchemaVersionError" in trainer.ledger[1]["shards_rejected"]["s1"]
    assert all("s1" not in e["groups"] for e in trainer.ledger)
    # the generators' backpressure input: every shard read, and where the next unread one goes
    # (the last batch taken trained version 1 and published v2: the next would train v2)
    assert run.read_marker("trainer-intake") == {
        "stage": "filtered",
        "shards_read": 3,
        "next_step": 2,
    }
    # A rejected shard is also quarantined, with the reason, so no other reader trips on it.
    (doc,) = run.list_quarantined("filtered")
    assert doc["key"] == "s1" and doc["error"] == "SchemaVersionError" and doc["by"] == "trainer"
    assert "schema version 2" in doc["reason"] and io.source.list_ready() == ["s0", "s2"]
    run.commit_shard("filtered", "s3", _shard("s3", ["h", "i"]))
    _make_other_schema_version(run, "s3")
    io.source.list_ready()
    with pytest.raises(ShardRejected, match="schema version 2"):
        io.source.read("s3")
    assert run.quarantined_keys("filtered") == {"s1", "s3"}

    # Published weights are the trainer's weights and load back through load_policy.
    local = run.download_weights(2, tmp_path / "w2")
    published, _ = load_policy(str(local))
    for (name, a), b in zip(
        trainer.model.state_dict().items(), published.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # The shutdown checkpoint is committed and holds the ledger.
    ckpt = run.load_checkpoint(run.latest_checkpoint_step(), tmp_path / "c")
    assert run.latest_checkpoint_step() == 2
    assert len((ckpt / "ledger.jsonl").read_text().splitlines()) == 2


def test_weights_are_published_in_the_generators_dtype(model_dir, tmp_path):
    run = open_store(str(tmp_path / "store")).run(RUN, create=True)
    io = TrainerIO.over(run, weights_dtype="bfloat16")
    model, tok = load_policy(str(model_dir))
    io.publisher.publish(0, model, tok)
    io.publisher.publish(0, model, tok)  # the same weights again: a no-op, not a conflict
    assert io.publisher.latest_version() == 0
    local = run.download_weights(0, tmp_path / "w0")
    tensors = load_file(local / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    reloaded, _ = load_policy(str(local))
    ref = model.model.embed_tokens.weight.to(torch.bfloat16).float()
    assert torch.equal(reloaded.model.embed_tokens.weight, ref)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


SCRIPT = r"""
import sys
from scalerl.config import load_config
from scalerl.trainer import Trainer, TrainerOptions
from storage import open_store
from runtime.trainer_io import TrainerIO
store, run_id, model_dir = sys.argv[1:]
io = TrainerIO.over(open_store(store).run(run_id), weights_dtype="float32")
cfg = load_config(preset="tiny-cpu", overrides=[
    f"model.name_or_path={model_dir}", "model.dtype=float32", "generation.prompts_per_batch=2",
    "generation.samples_per_prompt=4", "trainer.micro_batch_tokens=64",
    "trainer.checkpoint_every=3", "schedule.max_steps=6", "pipeline.max_off_policy_steps=8"])
Trainer(cfg, run_id=run_id, source=io.source, publisher=io.publisher, checkpoints=io.checkpoints,
        metrics=io.metrics, options=TrainerOptions(poll_interval_s=0.01, idle_timeout_s=5)).train()
"""


@pytest.mark.slow
def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(model_dir, tmp_path):
    store = tmp_path / "store"
    run = open_store(str(store)).run(RUN, create=True)
    for n in range(6):
        run.commit_shard("filtered", f"s{n}", _shard(f"s{n}", [f"a{n}", f"b{n}"]))
    io = TrainerIO.over(run, weights_dtype="float32")
    cfg = _config(model_dir)
    parts = dict(source=io.source, publisher=io.publisher, checkpoints=io.checkpoints)
    Trainer(cfg, run_id=RUN, metrics=io.metrics, **parts).train()  # steps 1-3, checkpoint 3
    assert run.latest_checkpoint_step() == 3

    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SCALERL_STORAGE_FAULT": "checkpoint.before_manifest",  # hang with files half-committed
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), str(store), RUN, str(model_dir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    ckpt6 = store / RUN / "checkpoints" / "step-6"
    deadline = time.monotonic() + 240
    while not (ckpt6 / "trainer_state.json").exists():  # files of step 6 are being uploaded
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    assert run.latest_checkpoint_step() == 3  # the half-written step 6 is not visible
    resumed = Trainer(
        _config(model_dir, **{"schedule.max_steps": 6}),
        run_id=RUN,
        metrics=io.metrics,
        options=TrainerOptions(poll_interval_s=0.01, idle_timeout_s=0.05),
        **parts,
    )
    assert resumed.train().version == 6
    assert run.latest_checkpoint_step() == 6
    assert [e["version"] for e in resumed.ledger] == [0, 1, 2, 3, 4, 5]
