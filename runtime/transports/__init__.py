"""Weight transports: how policy version v travels from the trainer to the generators and the
evaluations (config `weights`), what is durable when, and who still reads which version.

    transport = transport_for(config)                   # picked once, from weights.transport
    publisher = transport.publisher(run, "bfloat16")    # the trainer's WeightPublisher
    source = transport.source(run, cache, v, lease, engine, "gen0")  # a generator's WeightSource
    lease = ReaderLease(run, "gen0"); lease.hold(v)     # before loading v; the pruner keeps it

The transports, one interface (base.py WeightTransport) each:
- store (store.py): every version through the run store; every generator downloads it.
- local (local.py): one node; the trainer renames each version into a node-local directory and
  engines reload from there; the store receives the durable versions.
- nccl (nccl.py, GPU only): vLLM's NCCL weight-transfer engine, with the store as the control
  plane; the store receives the durable versions.
Shared by all: the publish and its ledger (publisher.py) and the readers' leases (readers.py),
which retention (runtime/retention.py) reads too.

transport_for is the only place outside the config (scalerl/config.py) that looks at the
transport's name: a new transport is a module here, its entry in TRANSPORTS and its config
variant.
"""

from __future__ import annotations

from runtime.transports.base import WeightTransport
from runtime.transports.local import LocalTransport
from runtime.transports.nccl import NcclTransport
from runtime.transports.readers import ReaderLease
from runtime.transports.store import StoreTransport
from scalerl.config import RunConfig
from storage import Run

__all__ = [
    "ReaderLease",
    "WeightTransport",
    "end_of_run",
    "published_version",
    "transport_for",
]

TRANSPORTS: dict[str, type[WeightTransport]] = {
    t.name: t for t in (StoreTransport, LocalTransport, NcclTransport)
}


def transport_for(config: RunConfig) -> WeightTransport:
    """The transport config.weights names, over `config`."""
    return TRANSPORTS[config.weights.transport](config)


def published_version(run: Run, config: RunConfig) -> int | None:
    """The newest version the generators can have (the transport's answer)."""
    return transport_for(config).published_version(run)


def end_of_run(config: RunConfig, run: Run) -> None:
    """What the transport leaves behind when the run ends (finished, stopped, stalled, failed)
    is cleaned up: transport local drops its node-local directory (memory under /dev/shm); the
    store holds every version a resume or an evaluation needs."""
    transport_for(config).end_of_run(run)
