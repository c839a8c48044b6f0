"""weights.transport = nccl (GPU only): each version goes GPU to GPU over vLLM's NCCL
weight-transfer engine (vllm/distributed/weight_transfer/nccl_engine.py), trainer rank 0 to
every generator engine's workers, with the run store as the control plane.

    trainer (publisher thread)                  generator gen{i} (between two engine steps)
    NCCLTrainerWeightTransferEngine             NcclWeights.poll() -> engine.weight_transfer()
        client = StoreControlPlane  ---- marker nccl-rpc {seq, method, payload} ---->
                                    <--- marker nccl-ack-gen{i} {seq, error?} -------

What is ours and what is vLLM's: vLLM ships both ends of the transfer (the trainer engine that
packs and broadcasts, the worker engine that receives and loads layer by layer) and the worker
RPCs (init_weight_transfer_engine, start_weight_update, update_weights, finish_weight_update).
It leaves the control plane to the caller (an HTTP server, Ray actors). Here the generators
are processes without a server, so the control plane is two small markers in the run store:
the trainer's client writes the current call, each generator runs it on its engine between
steps and acknowledges it; the client returns when every generator has. update_weights runs
on the generators while the trainer broadcasts (NCCL pairs them).

- Group: 1 trainer sender + every generator's tensor_parallel workers. Generators announce
  themselves (marker nccl-ready-{id}: tensor_parallel, an instance id); the trainer opens the
  group once all config.generation.num_generators are ready, giving generator i (sorted ids)
  rank_offset 1 + i x tensor_parallel (vLLM's trainer engine gives every worker offset 1,
  which fits one engine only). A generator that restarts announces a new instance: the
  trainer opens a new group at its next publish.
- The stall: from start_weight_update to finish_weight_update the generator stays inside
  poll(), so no engine step runs while layers are replaced; the version is set on the engine
  at finish (per-token versions exact, as for the other transports).
- Durability: as transport local, the store receives version 0, every durable_every-th,
  evaluation and checkpoint versions (durable_beside_store; TransportPublisher's ledger);
  evaluations load from the store.
- Failure: a generator that does not acknowledge within NCCL_TIMEOUT_S fails the publish,
  which fails the trainer task (retried, resumed from its checkpoint) with the missing
  generators named.

Tests: the control plane on CPU (tests/runtime/test_weights_nccl.py, an engine stand-in that
records the worker RPCs, since NCCL needs GPUs), and a publish through vLLM's own trainer
engine whose generators parse each call with vLLM's own init/update-info dataclasses (the
broadcast stubbed): what the two sides build must be what vLLM accepts. The transfer itself is
marked gpu.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from runtime.transports.base import WeightTransport, durable_beside_store
from runtime.transports.publisher import TransportPublisher
from runtime.transports.readers import ReaderLease
from scalerl.engines.base import Throttled
from storage import Run

log = logging.getLogger(__name__)

RPC = "nccl-rpc"
ACK = "nccl-ack-"
READY = "nccl-ready-"
NCCL_TIMEOUT_S = 600.0
POLL_S = 0.01  # control-plane reads during a call: local disk
POLL_S_REMOTE = 0.1  # object storage (a request each)


class NcclTransportError(RuntimeError):
    pass


class StoreControlPlane:
    """vLLM's VLLMWeightSyncClient (four methods) over run-store markers (module docstring)."""

    def __init__(self, run: Run, generators: dict[str, dict], timeout_s: float = NCCL_TIMEOUT_S):
        self.run, self.generators, self.timeout_s = run, generators, timeout_s
        self.version: int | None = None
        doc = run.read_marker(RPC) or {}
        self.seq = int(doc.get("seq", 0))

    def _call(self, method: str, payload: dict | None = None) -> None:
        self.seq += 1
        self.run.write_marker(
            RPC,
            {
                "seq": self.seq,
                "method": method,
                "payload": payload or {},
                "generators": {g: d["instance"] for g, d in self.generators.items()},
            },
        )
        deadline = time.monotonic() + self.timeout_s
        waiting = set(self.generators)
        while waiting:
            acks = self.run.read_markers(ACK)
            for g in list(waiting):
                ack = acks.get(f"{ACK}{g}") or {}
                if (
                    ack.get("seq") == self.seq
                    and ack.get("instance") == self.generators[g]["instance"]
                ):
                    if ack.get("error"):
                        raise NcclTransportError(
                            f"generator {g} failed {method}: {ack['error']}. Fix: see its log; "
                            "the trainer is retried and opens a new group."
                        )
                    waiting.discard(g)
            if waiting and time.monotonic() > deadline:
                raise NcclTransportError(
                    f"generator(s) {', '.join(sorted(waiting))} did not acknowledge {method} "
                    f"within {self.timeout_s:.0f} s (weights.transport = nccl). Fix: check that "
                    "they run; the trainer is retried and opens a new group with the live ones."
                )
            if waiting:
                time.sleep(POLL_S if self.run.is_local else POLL_S_REMOTE)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._call("init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def update_weights(self, update_info) -> None:
        self._call("update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """vLLM's trainer engine calls it without a version: the one being sent (.version,
        set by the publisher) goes along, and the generators set it on their engines."""
        version = self.version if weight_version is None else int(weight_version)
        self._call("finish_weight_update", {"weight_version": version})


def trainer_init_info(address: str, port: int, generators: int, tp: int):
    """vLLM's NCCLTrainerInitInfo for the group: 1 sender + every generator's tp workers.
    rank (keyword-only and required in vLLM 0.32) is 0: only trainer rank 0 publishes
    (TrainerLoop.publish), and vLLM's sender is the rank whose init info says rank 0; the other
    trainer ranks never open the group."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    return NCCLTrainerInitInfo(
        master_address=address, master_port=port, world_size=1 + tp * generators, rank=0
    )


def worker_init_info(init_info: dict, generators, generator_id: str, tp: int) -> dict:
    """What a generator passes to its workers' init_weight_transfer_engine, which vLLM parses
    into NCCLWeightTransferInitInfo(**it): the trainer engine's payload (made for one engine,
    rank_offset 1) with this generator's offset, 1 + its index among the sorted ids x tp."""
    offset = 1 + sorted(generators).index(generator_id) * tp
    return {**init_info, "rank_offset": offset}


def ready_generators(run: Run) -> dict[str, dict]:
    """Generators announced for the NCCL group whose registration is live (tasks/rollouts.py:
    a heartbeat younger than its TTL): an ended or dead one is not waited for."""
    from runtime.registry import live_generators

    live = live_generators(run)
    return {
        gid: doc
        for name, doc in run.read_markers(READY).items()
        if (gid := name[len(READY) :]) in live
    }


def bounded(fn, timeout_s: float, what: str):
    """fn() on a thread; when it has not returned within timeout_s (an NCCL call waiting for
    a peer that is gone: NCCL itself never times out here), the process exits, so that its
    task is retried (the trainer resumes from its checkpoint; a generator is replaced)."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name=f"nccl-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.error(
            "%s did not finish within %.0f s (weights.transport = nccl: a peer is gone); this "
            "process exits so that it is restarted",
            what,
            timeout_s,
        )
        logging.shutdown()
        os._exit(75)
    if "error" in box:
        raise box["error"]
    return box.get("value")


class NcclPublisher(TransportPublisher):  # pragma: no cover - gpu
    """The trainer's publisher for transport nccl (module docstring)."""

    def __init__(self, run: Run, transport, dtype: str | None = None) -> None:
        super().__init__(run, transport, dtype)
        self._engine = None
        self._members: dict[str, dict] = {}
        self._last = None

    def publish(self, version: int, model, tokenizer, state_dict: dict | None = None) -> None:
        state = state_dict if state_dict is not None else model.state_dict()
        self._last = (version, model, tokenizer, state)  # for make_durable
        if self.transport.durable(version):
            super().publish(version, model, tokenizer, state_dict)  # the store's copy, ledger
        else:
            size = sum(t.numel() * self.dtype.itemsize for t in state.values())
            self._ledger(version, False, size)
        if version == 0:
            return  # generators start from the store's version 0
        self._send(version, state)

    def make_durable(self, version: int) -> None:
        """A checkpoint's version (the final one included) goes to the store too: from the
        last state sent, which is that version (checkpoints follow the publish)."""
        if self.run.has_weights(version) or self._last is None or self._last[0] != version:
            return
        _, model, tokenizer, state = self._last
        TransportPublisher.publish(self, version, model, tokenizer, state, durable=True)

    def _group(self, state: dict):
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

        want = self.config.generation.num_generators
        deadline = time.monotonic() + NCCL_TIMEOUT_S
        while len(members := ready_generators(self.run)) < want:
            if time.monotonic() > deadline:
                raise NcclTransportError(
                    f"{len(members)} of {want} generators announced themselves for the NCCL "
                    f"weight transfer within {NCCL_TIMEOUT_S:.0f} s. Fix: check the generators' "
                    "logs, or use weights.transport=store."
                )
            time.sleep(0.5)
        if self._engine is not None and members == self._members:
            return self._engine
        if self._engine is not None:
            self._engine.shutdown()
        tp = self.config.placement.tensor_parallel
        from vllm.utils.network_utils import get_open_port  # a free port, as vLLM picks one

        info = trainer_init_info(self._address(members), get_open_port(), len(members), tp)
        self._source = _state_source(self.dtype)
        client = StoreControlPlane(self.run, members)
        self._engine = bounded(
            lambda: NCCLTrainerWeightTransferEngine.trainer_init(
                info, client=client, source=self._source
            ),
            NCCL_TIMEOUT_S,
            "opening the NCCL weight-transfer group",
        )
        self._members = members
        return self._engine

    def _address(self, members: dict[str, dict]) -> str:
        """The address generators reach this trainer at: weights.nccl_address, else this
        host's; a loopback address only when every generator runs on this host."""
        if self.config.weights.nccl_address:
            return self.config.weights.nccl_address
        address = socket.gethostbyname(socket.gethostname())
        here = socket.gethostname()
        elsewhere = sorted(g for g, d in members.items() if d.get("host") != here)
        if address.startswith("127.") and elsewhere:
            raise NcclTransportError(
                f"this host's name resolves to {address} (loopback), which generators "
                f"{', '.join(elsewhere)} on other machines cannot reach. Fix: set "
                "weights.nccl_address to this machine's address on their network."
            )
        return address

    def _send(self, version: int, state: dict) -> None:
        engine = self._group(state)
        self._source.state = state
        engine.client.version = version  # finish_weight_update carries it to the generators
        bounded(engine.send_weights, NCCL_TIMEOUT_S, f"sending weights v{version}")


def _state_source(dtype):  # pragma: no cover - gpu
    """vLLM's WeightSource over a CPU state dict (set .state before each send): each tensor
    goes to the GPU, in the publish dtype, as it is sent; a tied head is sent once (vLLM ties
    it again on load)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class StateSource(WeightSource):
        def __init__(self) -> None:
            self.state: dict = {}

        def _tensors(self):
            seen = set()
            for name, t in self.state.items():
                if t.data_ptr() in seen:
                    continue
                seen.add(t.data_ptr())
                yield name, t

        def _dtype(self, t):
            return dtype if t.is_floating_point() else t.dtype

        def metadata(self):
            return [ParamMeta(n, self._dtype(t), tuple(t.shape)) for n, t in self._tensors()]

        def __iter__(self):
            for name, t in self._tensors():
                yield name, t.to("cuda", non_blocking=True).to(self._dtype(t))

    return StateSource()


class NcclWeights:
    """The generator's WeightSource for transport nccl: runs the trainer's calls on its engine
    between two engine steps (module docstring). poll() never returns a directory: the weights
    arrive through update_weights, and the version is set on the engine at set_version."""

    def __init__(self, run: Run, engine, generator_id: str, lease: ReaderLease | None, tp: int = 1):
        self.run, self.engine, self.id, self.lease = run, engine, generator_id, lease
        self.instance = uuid.uuid4().hex
        self.done = int((run.read_marker(RPC) or {}).get("seq", 0))
        run.write_marker(
            f"{READY}{generator_id}",
            {"tensor_parallel": tp, "instance": self.instance, "host": socket.gethostname()},
        )
        self.tp = tp

    def close(self) -> None:
        """Out of the group: the trainer stops waiting for this generator."""
        self.run.delete_marker(f"{READY}{self.id}")

    def _member(self, doc: dict) -> bool:
        """Whether the call is for this generator: its id with this very instance (a restarted
        generator is not in the group its earlier instance joined)."""
        return (doc.get("generators") or {}).get(self.id) == self.instance

    def poll(self):
        doc = self.run.read_marker(RPC)
        while doc is not None and int(doc.get("seq", 0)) > self.done:
            method, member = doc["method"], self._member(doc)
            self._run(doc)
            if member and method in ("start_weight_update", "update_weights"):
                doc = self._next(doc["seq"])  # no engine step until finish_weight_update
            else:
                return None
        return None

    def _next(self, seq: int) -> dict:
        deadline = time.monotonic() + NCCL_TIMEOUT_S
        while True:
            doc = self.run.read_marker(RPC) or {}
            if int(doc.get("seq", 0)) > seq:
                return doc
            if time.monotonic() > deadline:
                raise NcclTransportError(
                    f"generator {self.id}: the trainer sent nothing after call {seq} within "
                    f"{NCCL_TIMEOUT_S:.0f} s, in the middle of a weight update. Fix: check the "
                    "trainer; this generator is restarted and joins a new group."
                )
            time.sleep(POLL_S if self.run.is_local else POLL_S_REMOTE)

    def _run(self, doc: dict) -> None:
        seq, method, payload = int(doc["seq"]), doc["method"], doc.get("payload") or {}
        error = None
        if not self._member(doc):
            self.done = seq  # a group without this instance (it started after the group was
            return  # opened, or it is a restart): the trainer opens a new one with it
        try:
            if method == "init_weight_transfer_engine":
                info = worker_init_info(payload["init_info"], doc["generators"], self.id, self.tp)
                self.engine.weight_transfer("init_weight_transfer_engine", init_info=info)
            elif method == "start_weight_update":
                self.engine.weight_transfer(method)
            elif method == "finish_weight_update":
                self.engine.weight_transfer(method)
                version = int(payload["weight_version"])
                self.engine.set_version(version)  # before the next engine step
                if self.lease is not None:
                    self.lease.hold(version)
            elif method == "update_weights":  # blocks in NCCL until the broadcast ends
                bounded(
                    lambda: self.engine.weight_transfer(
                        "update_weights", update_info=payload["update_info"]
                    ),
                    NCCL_TIMEOUT_S,
                    f"generator {self.id} receiving weights",
                )
            else:
                raise NcclTransportError(f"unknown call {method!r}")
        except Exception as e:  # noqa: BLE001 - reported to the trainer, then raised here
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.done = seq
            self.run.write_marker(
                f"{ACK}{self.id}", {"seq": seq, "instance": self.instance, "error": error}
            )


class NcclTransport(WeightTransport):
    name = "nccl"

    def publisher(
        self, run: Run, dtype: str | None = None
    ) -> NcclPublisher:  # pragma: no cover - gpu
        return NcclPublisher(run, self, dtype)

    def source(
        self, run: Run, cache, current: int, lease=None, engine=None, reader="gen0"
    ):  # pragma: no cover - gpu
        """The control-plane marker, as often as the local pointer on a local disk."""
        tp = self.config.placement.tensor_parallel
        source = NcclWeights(run, engine, reader, lease, tp)
        return Throttled(source, interval_s=0.02 if run.is_local else 0.25)

    def durable(self, version: int) -> bool:
        return durable_beside_store(self.config, version)

    def engine_args(self) -> dict:
        return {"weight_transfer_config": {"backend": "nccl"}}

    def check(self, accelerator: str) -> None:
        if accelerator == "cpu":
            raise ValueError(
                "weights.transport = 'nccl' sends weights GPU to GPU, and placement.accelerator "
                f"= {self.config.placement.accelerator!r} found no CUDA device here. Fix: "
                "weights.transport=local (one node) or store."
            )
