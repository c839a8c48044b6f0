"""Weight transports: how policy version v travels from the trainer to the generators and the
evaluations (config `weights`). The public face of the transports; the rest of the project
imports from here only.

(Being restructured: store, local and nccl behind one interface chosen by a factory.)
"""

from __future__ import annotations

from runtime.weights import ReaderLease, drop_local_weights, published_version

__all__ = ["ReaderLease", "end_of_run", "published_version"]


def end_of_run(config, run) -> None:
    """What the transport leaves behind when the run ends (finished, stopped, stalled, failed):
    transport local drops its node-local directory (memory under /dev/shm); the store holds
    every version a resume or an evaluation needs."""
    drop_local_weights(config, run.run_id)
