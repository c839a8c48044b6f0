"""The NCCL transport's control plane (runtime/transports/nccl.py) on a real local run store: the
trainer's VLLMWeightSyncClient over markers, and two generators answering between engine steps.
NCCL itself needs GPUs, so the generators' engine is a stand-in that records vLLM's worker calls
(what VLLMEngine.weight_transfer forwards to collective_rpc); the real transfer is gpu-marked.
What each side builds is checked against vLLM's own dataclasses (NCCLTrainerInitInfo, and the
workers' NCCLWeightTransferInitInfo / NCCLWeightTransferUpdateInfo, parsed as vLLM's workers
parse them), through vLLM's own trainer engine with only the NCCL calls stubbed."""

from __future__ import annotations

import threading
import time

import pytest

from runtime.registry import GeneratorRegistration
from runtime.transports.nccl import (
    NcclTransportError,
    NcclWeights,
    StoreControlPlane,
    ready_generators,
    trainer_init_info,
    worker_init_info,
)
from runtime.transports.readers import ReaderLease, held_versions
from storage import open_store


class RecordingEngine:
    """Records vLLM worker calls and engine steps, in order."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.events: list[tuple] = []
        self.version = 0
        self.fail_on = fail_on

    def weight_transfer(self, method: str, **kwargs) -> None:
        if method == self.fail_on:
            raise RuntimeError(f"{method} broke")
        self.events.append(("rpc", method, kwargs))

    def set_version(self, version: int) -> None:
        self.version = version
        self.events.append(("version", version))


def _generator(source: NcclWeights, engine: RecordingEngine, stop: threading.Event, errors: list):
    """A generator loop: poll between steps, like VLLMEngine.generate."""
    try:
        while not stop.is_set():
            source.poll()
            engine.events.append(("step", engine.version))
            time.sleep(0.002)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        errors.append(e)


@pytest.fixture
def run(tmp_path):
    return open_store(str(tmp_path / "store")).run("nccl", create=True)


def _start(run, engines: dict[str, RecordingEngine], tp: int = 2):
    stop, errors, threads, sources = threading.Event(), [], [], {}
    for gid, engine in engines.items():
        GeneratorRegistration(run, gid)  # as generator_body does: the trainer counts live ones
        source = NcclWeights(run, engine, gid, ReaderLease(run, gid), tp=tp)
        sources[gid] = source
        t = threading.Thread(target=_generator, args=(source, engine, stop, errors), daemon=True)
        t.start()
        threads.append(t)
    return stop, errors, threads, sources


def test_a_weight_update_round_reaches_every_generator_between_steps(run):
    engines = {"gen0": RecordingEngine(), "gen1": RecordingEngine()}
    stop, errors, threads, sources = _start(run, engines)
    members = ready_generators(run)
    assert sorted(members) == ["gen0", "gen1"] and members["gen0"]["tensor_parallel"] == 2
    client = StoreControlPlane(run, members, timeout_s=30)
    # what NCCLTrainerWeightTransferEngine does: init once, then per version start, update
    # (beside the broadcast), finish
    client.init_weight_transfer_engine(
        {"master_address": "127.0.0.1", "master_port": 1, "world_size": 5, "rank_offset": 1}
    )
    client.version = 7
    client.start_weight_update()
    client.update_weights({"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2]]})
    client.finish_weight_update()
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(5)
    assert not errors
    for i, (gid, engine) in enumerate(sorted(engines.items())):
        rpcs = [e for e in engine.events if e[0] == "rpc"]
        assert [m for _, m, _ in rpcs] == [
            "init_weight_transfer_engine",
            "start_weight_update",
            "update_weights",
            "finish_weight_update",
        ], gid
        # generator i's workers sit after the trainer (rank 0) and generator i-1's 2 workers
        assert rpcs[0][2]["init_info"]["rank_offset"] == 1 + 2 * i
        assert rpcs[2][2]["update_info"]["names"] == ["w"]
        # no engine step between start and the new version: the stall is the update itself
        kinds = [e[0] if e[0] != "rpc" else e[1] for e in engine.events]
        start, version = kinds.index("start_weight_update"), kinds.index("version")
        assert "step" not in kinds[start:version]
        assert ("version", 7) in engine.events and engine.version == 7
        after = [e for e in engine.events[version:] if e[0] == "step"]
        assert after and all(v == 7 for _, v in after)  # every later step is tagged 7
    assert held_versions(run) == {"gen0": 7, "gen1": 7}

    # gen1 restarts (a new instance, same id): the old group's calls are not for it, and the
    # trainer sees a changed membership (it opens a new group); gen0 ends: not waited for
    restarted = RecordingEngine()
    source = NcclWeights(run, restarted, "gen1", None, tp=2)
    assert ready_generators(run)["gen1"]["instance"] != members["gen1"]["instance"]
    stop, errs = threading.Event(), []
    t = threading.Thread(target=_generator, args=(source, restarted, stop, errs), daemon=True)
    t.start()
    old_group = StoreControlPlane(run, {"gen1": members["gen1"]}, timeout_s=1)
    with pytest.raises(NcclTransportError, match=r"gen1 did not acknowledge"):
        old_group.start_weight_update()
    stop.set()
    t.join(5)
    assert not errs and not [e for e in restarted.events if e[0] == "rpc"]
    sources["gen0"].close()
    assert sorted(ready_generators(run)) == ["gen1"]


def test_a_generator_that_fails_or_is_missing_is_named(run):
    engines = {"gen0": RecordingEngine(fail_on="update_weights")}
    stop, errors, threads, _ = _start(run, engines, tp=1)
    client = StoreControlPlane(run, ready_generators(run), timeout_s=30)
    client.version = 1
    client.start_weight_update()
    with pytest.raises(
        NcclTransportError,
        match="generator gen0 failed update_weights: RuntimeError: update_weights broke",
    ):
        client.update_weights({"names": []})
    stop.set()
    for t in threads:
        t.join(5)
    assert errors and "broke" in str(errors[0])  # the generator fails too (it is restarted)

    ghost = {"gen9": {"instance": "x", "tensor_parallel": 1}}
    with pytest.raises(
        NcclTransportError,
        match=r"generator\(s\) gen9 did not acknowledge start_weight_update within 0 s",
    ):
        StoreControlPlane(run, ghost, timeout_s=0.2).start_weight_update()


def _vllm_nccl():
    """vLLM's dense NCCL backend module (its dataclasses need no GPU)."""
    return pytest.importorskip("vllm.distributed.weight_transfer.nccl_engine")


class ParsingEngine(RecordingEngine):
    """A generator whose workers parse each call as vLLM 0.32's Worker does
    (init_weight_transfer_engine / update_weights: the backend's parse_init_info and
    parse_update_info, i.e. its own dataclasses): a missing or unknown field fails here as it
    would on the GPU."""

    def __init__(self) -> None:
        super().__init__()
        cls = _vllm_nccl().NCCLWeightTransferEngine
        self.parser = cls.__new__(cls)  # parse_*_info read only the class's dataclass types
        self.parsed: list = []

    def weight_transfer(self, method: str, **kwargs) -> None:
        if method == "init_weight_transfer_engine":
            self.parsed.append(self.parser.parse_init_info(kwargs["init_info"]))
        elif method == "update_weights":
            self.parsed.append(self.parser.parse_update_info(kwargs["update_info"]))
        super().weight_transfer(method, **kwargs)


def test_each_side_builds_vllms_own_init_info():
    nccl = _vllm_nccl()
    from vllm.distributed.weight_transfer.nccl_common import worker_init_payload

    info = trainer_init_info("10.0.0.1", 29555, generators=2, tp=2)
    assert isinstance(info, nccl.NCCLTrainerInitInfo)
    assert (info.rank, info.is_sender, info.world_size) == (0, True, 1 + 2 * 2)
    # what vLLM's trainer_init sends every worker (made for one engine: rank_offset 1)
    payload = worker_init_payload(
        nccl.NCCLWeightTransferInitInfo(
            master_address=info.master_address,
            master_port=info.master_port,
            rank_offset=1,
            world_size=info.world_size,
            packed=info.packed,
        )
    )
    ranks = []
    for gid in ("gen1", "gen0"):
        w = nccl.NCCLWeightTransferInitInfo(**worker_init_info(payload, ["gen0", "gen1"], gid, 2))
        assert (w.master_address, w.master_port, w.world_size) == ("10.0.0.1", 29555, 5)
        ranks += [w.rank_offset + r for r in range(2)]  # vLLM: rank_offset + worker rank
    assert sorted(ranks) == [1, 2, 3, 4]  # every rank but the sender's, once


def test_a_publish_through_vllms_trainer_engine_reaches_the_generators(run, monkeypatch, tmp_path):
    """NcclPublisher.publish as on the GPU, through vLLM's NCCLTrainerWeightTransferEngine;
    only NCCL itself (the endpoint and the broadcast) is stubbed. The generators parse every
    call with vLLM's dataclasses."""
    import torch

    from runtime.transports import transport_for
    from scalerl.config import load_config

    nccl = _vllm_nccl()
    sent: list = []
    monkeypatch.setattr(nccl, "open_trainer_endpoint", lambda info: object())
    monkeypatch.setattr(
        nccl.NCCLTrainerWeightTransferEngine,
        "_broadcast",
        lambda self, source, meta: sent.append([m.name for m in meta]),
    )
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={tmp_path / 'runs'}",
            "placement.accelerator=cuda",
            "placement.devices_per_node=4",
            "generation.engine=vllm",
            "generation.num_generators=2",
            "weights.transport=nccl",
            "weights.nccl_address=127.0.0.1",
            "weights.durable_every=4",
            "evaluation.every_steps=100",
        ],
    )
    engines = {"gen0": ParsingEngine(), "gen1": ParsingEngine()}
    stop, errors, threads, _ = _start(run, engines, tp=1)
    emb = torch.randn(6, 4)
    state = {
        "model.embed_tokens.weight": emb,
        "model.norm.weight": torch.ones(4),
        "lm_head.weight": emb,  # tied: sent once, vLLM ties it again on load
        "model.step": torch.tensor([3]),
    }
    transport_for(cfg).publisher(run, "bfloat16").publish(3, None, None, state)
    stop.set()
    for t in threads:
        t.join(5)
    assert not errors
    names = ["model.embed_tokens.weight", "model.norm.weight", "model.step"]
    assert sent == [names]
    for i, (gid, engine) in enumerate(sorted(engines.items())):
        init, update = engine.parsed
        assert isinstance(init, nccl.NCCLWeightTransferInitInfo), gid
        assert (init.master_address, init.world_size, init.rank_offset) == ("127.0.0.1", 3, 1 + i)
        assert isinstance(update, nccl.NCCLWeightTransferUpdateInfo)
        assert update.names == names
        assert update.dtype_names == ["bfloat16", "bfloat16", "int64"]
        assert update.shapes == [[6, 4], [4], [1]]
        assert engine.version == 3
    assert [(r["version"], r["durable"]) for r in run.read_metrics("weights").to_pylist()] == [
        (3, False)
    ]


@pytest.mark.gpu
@pytest.mark.skipif(
    not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
    reason="needs 2 CUDA GPUs (NCCL refuses two ranks on one device)",
)
def test_a_whole_run_over_nccl(tmp_path):  # pragma: no cover - gpu
    """tiny-cpu's recipe on two GPUs: the trainer on one, a vLLM generator on the other, every
    version sent over NCCL; the store keeps the durable ones and the run verifies clean."""
    import subprocess
    import sys
    from pathlib import Path

    from runtime.verify import verify_run

    root = tmp_path / "runs"
    cmd = [
        str(Path(sys.executable).parent / "scalerl"), "run", "--preset", "tiny-cpu",
        "--storage", str(root), "--run-id", "nccl-run",
        "--set", "placement.accelerator=cuda", "--set", "placement.devices_per_node=2",
        "--set", "placement.trainer_ranks=1", "--set", "generation.num_generators=1",
        "--set", "generation.engine=vllm", "--set", "weights.transport=nccl",
        "--set", "weights.durable_every=4", "--set", "schedule.max_steps=6",
        "--set", "evaluation.every_steps=100",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    run = open_store(str(root)).run("nccl-run")
    ledger = run.read_metrics("weights").to_pylist()
    assert [r["version"] for r in ledger] == list(range(7))
    assert {r["version"] for r in ledger if r["durable"]} >= {0, 4, 6}
    report = verify_run(run)
    assert report.ok, report.problems
