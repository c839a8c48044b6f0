"""The NCCL transport's control plane (runtime/transports/nccl.py) on a real local run store: the
trainer's VLLMWeightSyncClient over markers, and two generators answering between engine steps.
NCCL itself needs GPUs, so the generators' engine is a stand-in that records vLLM's worker calls
(what VLLMEngine.weight_transfer forwards to collective_rpc); the real transfer is gpu-marked."""

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
