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
  evaluation and checkpoint versions (TransportPublisher's rules and ledger); evaluations load
  from the store.
- Failure: a generator that does not acknowledge within NCCL_TIMEOUT_S fails the publish,
  which fails the trainer task (retried, resumed from its checkpoint) with the missing
  generators named.

Tests: the control plane on CPU (tests/tasks/test_weights_nccl.py, an engine stand-in that
records the worker RPCs, since NCCL needs GPUs); the transfer itself is marked gpu.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid

from scalerl.config import RunConfig
from storage import Run
from tasks.weights import ReaderLease, TransportPublisher, always_durable

log = logging.getLogger(__name__)

RPC = "nccl-rpc"
ACK = "nccl-ack-"
READY = "nccl-ready-"
NCCL_TIMEOUT_S = 600.0
POLL_S = 0.01


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
                if ack.get("seq") == self.seq:
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
                time.sleep(POLL_S)

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


def ready_generators(run: Run) -> dict[str, dict]:
    return {name[len(READY) :]: doc for name, doc in run.read_markers(READY).items()}


class NcclPublisher(TransportPublisher):  # pragma: no cover - gpu
    """The trainer's publisher for transport nccl (module docstring)."""

    def __init__(self, run: Run, config: RunConfig, dtype: str | None = None) -> None:
        super().__init__(run, config, dtype)
        self._engine = None
        self._members: dict[str, dict] = {}
        self._last = None

    def publish(self, version: int, model, tokenizer, state_dict: dict | None = None) -> None:
        state = state_dict if state_dict is not None else model.state_dict()
        self._last = (version, model, tokenizer, state)  # for make_durable
        if always_durable(self.config, version):
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
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

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
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        info = NCCLTrainerInitInfo(
            master_address=socket.gethostbyname(socket.gethostname()),
            master_port=port,
            world_size=1 + tp * len(members),
        )
        self._source = _state_source(self.dtype)
        client = StoreControlPlane(self.run, members)
        self._engine = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=client, source=self._source
        )
        self._members = members
        return self._engine

    def _send(self, version: int, state: dict) -> None:
        engine = self._group(state)
        self._source.state = state
        engine.client.version = version  # finish_weight_update carries it to the generators
        engine.send_weights()


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

    def poll(self):
        if self.lease is not None:
            self.lease.heartbeat()
        doc = self.run.read_marker(RPC)
        while doc is not None and int(doc.get("seq", 0)) > self.done:
            method, member = doc["method"], self.id in (doc.get("generators") or {})
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
            time.sleep(POLL_S)

    def _run(self, doc: dict) -> None:
        seq, method, payload = int(doc["seq"]), doc["method"], doc.get("payload") or {}
        error = None
        try:
            if self.id not in (doc.get("generators") or {}):
                pass  # a group without this generator (it started after the group was opened)
            elif method == "init_weight_transfer_engine":
                order = sorted(doc["generators"])
                info = {**payload["init_info"], "rank_offset": 1 + order.index(self.id) * self.tp}
                self.engine.weight_transfer("init_weight_transfer_engine", init_info=info)
            elif method == "start_weight_update":
                self.engine.weight_transfer(method)
            elif method == "finish_weight_update":
                self.engine.weight_transfer(method)
                version = int(payload["weight_version"])
                self.engine.set_version(version)  # before the next engine step
                if self.lease is not None:
                    self.lease.hold(version)
            elif method == "update_weights":
                self.engine.weight_transfer("update_weights", update_info=payload["update_info"])
            else:
                raise NcclTransportError(f"unknown call {method!r}")
        except Exception as e:  # noqa: BLE001 - reported to the trainer, then raised here
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.done = seq
            self.run.write_marker(f"{ACK}{self.id}", {"seq": seq, "error": error})
