"""Weight transports and retention (runtime/transports/, runtime/retention.py) over a real local run
store and a real (tiny) transformers model: what the store receives with transport local,
the publish ledger, reader leases, and which versions retention keeps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from runtime.common import WeightCache
from runtime.retention import apply_plan, keep_checkpoints, keep_weights, prune_plan
from runtime.transports import transport_for
from runtime.transports.local import LocalDirs, LocalWeights, local_dirs
from runtime.transports.readers import READER_PREFIX, READER_TTL_S, ReaderLease, held_versions
from runtime.transports.store import StoreWeights
from scalerl.config import load_config
from scalerl.models import build_tiny_model, load_policy
from storage import open_store

RUN = "wt"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", hidden_size=32, heads=1)
    return load_policy(str(path))


def _cfg(tmp_path: Path, *overrides: str):
    """tiny-cpu over a store in tmp_path; with transport local, its directory in tmp_path too
    (weights.local_dir exists only with transport local)."""
    local = (
        [f"weights.local_dir={tmp_path / 'shm'}"] if "weights.transport=local" in overrides else []
    )
    return load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={tmp_path / 'store'}",
            "pipeline.max_off_policy_steps=2",
            "evaluation.every_steps=4",
            *overrides,
            *local,
        ],
    )


def _publisher(run, cfg, dtype: str = "float32"):
    """The trainer's publisher for cfg's transport, as TrainerIO builds it."""
    return transport_for(cfg).publisher(run, dtype)


def _run(cfg):
    return open_store(cfg.storage.url).run(RUN, create=True)


def test_keep_rules_written_out():
    # latest 20, k = 2: the window is v >= 20 - 2 - 1 = 17; evaluation every 5 keeps 0, 5, 10,
    # 15, 20; a live reader on v12 keeps 12..20; v0 always.
    versions = list(range(21))
    kept = keep_weights(
        versions, k=2, eval_every=5, keep_evaluated=True, evaluated=set(), held=[], running=True
    )
    assert kept == {0, 5, 10, 15, 17, 18, 19, 20}
    kept = keep_weights(
        versions, k=2, eval_every=5, keep_evaluated=True, evaluated=set(), held=[12], running=True
    )
    assert kept == {0, 5, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20}
    # evaluations not kept: an evaluation version goes once its evaluation is committed
    kept = keep_weights(
        versions, k=2, eval_every=5, keep_evaluated=False, evaluated={5, 10}, held=[], running=True
    )
    assert kept == {0, 15, 17, 18, 19, 20}
    # a finished run needs no window
    kept = keep_weights(
        versions,
        k=2,
        eval_every=5,
        keep_evaluated=False,
        evaluated=set(versions),
        held=[],
        running=False,
    )
    assert kept == {0, 20}
    assert keep_checkpoints([2, 4, 6, 8, 10, 12], last=2, every=4) == {4, 8, 10, 12}
    assert keep_checkpoints([2, 4, 6], last=3, every=None) == {2, 4, 6}


def test_local_transport_stores_only_durable_versions_and_ledgers_every_one(model, tmp_path):
    cfg = _cfg(
        tmp_path, "weights.transport=local", "weights.durable_every=3", "weights.prune=false"
    )
    run = _run(cfg)
    pub = _publisher(run, cfg)
    m, tok = model
    for v in range(7):
        pub.publish(v, m, tok)
    dirs = local_dirs(run)  # where the trainer says it keeps them (marker)
    assert dirs.root == tmp_path / "shm" / RUN
    assert dirs.latest() == 6 and dirs.list() == list(range(7))
    # durable: v0, multiples of durable_every (3, 6) and of evaluation.every_steps (4)
    assert run.list_weight_versions() == [0, 3, 4, 6]
    ledger = run.read_metrics("weights").to_pylist()
    assert [r["version"] for r in ledger] == list(range(7))
    assert [r["durable"] for r in ledger] == [v in (0, 3, 4, 6) for v in range(7)]
    assert all(r["transport"] == "local" for r in ledger)
    # the local copy is the trainer's weights, loadable in place
    loaded, _ = load_policy(str(dirs.path(5)))
    for (name, a), b in zip(m.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # a checkpoint at version 5 makes it durable from the local directory
    pub.make_durable(5)
    assert run.list_weight_versions() == [0, 3, 4, 5, 6]
    assert run.read_metrics("weights").to_pylist()[5]["durable"] is True
    assert pub.latest_version() == 6
    # no staging directory is left behind
    assert sorted(p.name for p in dirs.root.iterdir()) == ["LATEST", *[f"v{v}" for v in range(7)]]


def test_a_generator_reads_local_versions_in_place_under_its_lease(model, tmp_path):
    cfg = _cfg(tmp_path, "weights.transport=local")
    run = _run(cfg)
    pub = _publisher(run, cfg)
    m, tok = model
    pub.publish(0, m, tok)
    lease = ReaderLease(run, "gen0")
    source = LocalWeights(run, 0, lease)
    assert source.poll() is None  # nothing newer than 0
    pub.publish(1, m, tok)
    version, path = source.poll()
    assert (version, Path(path)) == (1, tmp_path / "shm" / RUN / "v1")
    assert held_versions(run) == {"gen0": 1}
    # WeightCache reads a version still in the local directory in place (no download)
    assert WeightCache(run, tmp_path / "cache", cfg).path(1) == tmp_path / "shm" / RUN / "v1"
    assert not (tmp_path / "cache" / "v1").exists()
    lease.release()


def test_the_local_directory_stays_small_and_other_machines_are_refused(model, tmp_path):
    """Node-local copies (memory under /dev/shm): the newest, the one before it and what a
    reader holds; leftovers of a killed trainer are swept; a reader on another host gets one
    clear error; /dev/shm is used only when it has room for LOCAL_COPIES versions."""
    import socket

    from runtime.transports.local import LOCAL_MARKER, LocalTransportError, choose_local_root

    cfg = _cfg(tmp_path, "weights.transport=local")
    run = _run(cfg)
    dirs = LocalDirs(tmp_path / "shm" / RUN)
    (dirs.root / ".tmp-v9-dead").mkdir(parents=True)  # a trainer killed while saving
    pub = _publisher(run, cfg)
    m, tok = model
    lease = ReaderLease(run, "slow")
    for v in range(6):
        pub.publish(v, m, tok)
        if v == 2:
            lease.hold(2)
    assert dirs.list() == [2, 3, 4, 5] and not (dirs.root / ".tmp-v9-dead").exists()
    lease.release()
    pub.publish(6, m, tok)
    assert dirs.list() == [5, 6]
    run.write_marker(LOCAL_MARKER, {"root": str(dirs.root), "host": "another-host"})
    with pytest.raises(LocalTransportError, match="on another-host, and this process runs on"):
        local_dirs(run)
    run.write_marker(LOCAL_MARKER, {"root": str(dirs.root), "host": socket.gethostname()})
    auto = _cfg(tmp_path, "weights.transport=local")
    auto.weights.local_dir = None
    assert choose_local_root(auto, "r", 1).parts[:3] == ("/", "dev", "shm")
    assert choose_local_root(auto, "r", 10**15).parts[1:3] != ("dev", "shm")  # no room there


def test_retention_keeps_what_a_slow_reader_holds_and_frees_it_after(model, tmp_path):
    """k = 2, evaluation every 4: a generator holding v1 keeps v1.. in the store while the
    trainer publishes up to v12; the window alone would keep v9..v12 (+ v0, v4, v8). Once
    the reader moves on (or its heartbeat is older than READER_TTL_S) they go."""
    cfg = _cfg(tmp_path)
    run = _run(cfg)
    pub = _publisher(run, cfg)
    m, tok = model
    pub.publish(0, m, tok)
    pub.publish(1, m, tok)
    slow = ReaderLease(run, "slow")
    slow.hold(1)
    for v in range(2, 13):
        pub.publish(v, m, tok)
    assert run.list_weight_versions() == list(range(13))  # nothing below the held v1 goes
    # the slow generator still downloads the version it holds, and finishes its batch on it
    cache = WeightCache(run, tmp_path / "slow-cache", cfg)
    assert (cache.path(1) / "config.json").is_file()

    slow.hold(12)  # it moves on
    pub.publish(13, m, tok)
    assert run.list_weight_versions() == [0, 4, 8, 10, 11, 12, 13]  # window 10.. + 0, 4, 8
    pruned = run.read_metrics("pruned", all_rows=True).to_pylist()
    assert sorted(r["number"] for r in pruned if r["kind"] == "weights") == [1, 2, 3, 5, 6, 7, 9]
    assert all(r["bytes"] > 0 for r in pruned)

    # a dead reader (no heartbeat for READER_TTL_S) holds nothing
    run.write_marker(
        f"{READER_PREFIX}dead", {"version": 10, "heartbeat": time.time() - READER_TTL_S - 1}
    )
    slow.release()
    assert held_versions(run) == {}
    pub.publish(14, m, tok)
    assert run.list_weight_versions() == [0, 4, 8, 11, 12, 13, 14]


def test_a_version_pruned_under_a_slow_reader_is_skipped_not_fatal(model, tmp_path):
    cfg = _cfg(tmp_path)
    run = _run(cfg)
    pub = _publisher(run, cfg)
    m, tok = model
    for v in range(3):
        pub.publish(v, m, tok)
    source = StoreWeights(WeightCache(run, tmp_path / "c", cfg), 0, ReaderLease(run, "g"))
    run.delete_weights(1)  # as if pruned between its LATEST read and its download
    version, _ = source.poll()
    assert version == 2
    # and a download of a pruned version raises (the source then looks again)
    from storage.errors import NotCommittedError

    with pytest.raises(NotCommittedError):
        run.download_weights(1, tmp_path / "x")


def test_checkpoints_are_kept_last_n_plus_every_mth(tmp_path):
    cfg = _cfg(tmp_path, "weights.keep_checkpoints=2", "weights.keep_checkpoint_every=4")
    run = _run(cfg)
    for step in (2, 4, 6, 8, 10):
        d = tmp_path / f"c{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")
        run.save_checkpoint(step, d)
    plan = prune_plan(run, cfg)
    assert plan.checkpoints == [2, 6] and plan.bytes == 4
    assert apply_plan(run, plan, by="test") == 4
    assert run.list_checkpoints() == [4, 8, 10]
    with pytest.raises(Exception, match="newest one"):
        run.delete_checkpoint(10)


def test_a_cast_to_the_generators_dtype_keeps_a_tied_head_one_tensor(model, tmp_path):
    """fp32 trainer, bf16 generators: each tensor is cast once, so the tied LM head is not
    written beside the embedding (it would double the head's bytes in every version)."""
    from safetensors import safe_open

    cfg = _cfg(tmp_path)
    run = _run(cfg)
    m, tok = model
    _publisher(run, cfg, "bfloat16").publish(0, m, tok)
    local = run.download_weights(0, tmp_path / "w0")
    with safe_open(local / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
