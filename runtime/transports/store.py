"""weights.transport = store: every version is published to the run store (weights/v{N}/,
manifest-last, sha256 of each file, all in the trainer's background publisher thread) and every
generator downloads it into a local cache. Durable; works across machines and clouds.
"""

from __future__ import annotations

from runtime.transports.base import WeightTransport
from runtime.transports.publisher import TransportPublisher
from scalerl.engines.base import Throttled
from storage import Run


class StoreWeights:
    """WeightSource over the run store: the newest committed version, downloaded once. The
    engine copies each version it is handed into its live parameters, so the local copies of
    the versions before it are deleted then (WeightCache.keep_only). With a lease, the version
    is held before it is downloaded (runtime/transports/readers.py ReaderLease); a version
    pruned meanwhile (a reader that slept through k + 2 publishes) is skipped for the next
    newest."""

    def __init__(self, cache, current: int, lease=None) -> None:
        self.cache, self.current, self.lease = cache, current, lease

    def poll(self):
        from storage.errors import NotCommittedError

        latest = self.cache.run.latest_weights_version()
        if latest is None or latest <= self.current:
            return None
        if self.lease is not None:
            self.lease.hold(latest)
        try:
            path = self.cache.path(latest)
        except NotCommittedError:  # pruned or republished meanwhile: look again next poll
            if self.lease is not None:
                self.lease.hold(self.current)
            return None
        self.current = latest
        self.cache.keep_only(latest)
        return latest, path


class StoreTransport(WeightTransport):
    name = "store"

    def publisher(self, run: Run, dtype: str | None = None) -> TransportPublisher:
        return TransportPublisher(run, self, dtype)

    def source(self, run: Run, cache, current: int, lease=None, engine=None, reader="gen0"):
        """The store every 0.2 s on a local disk and every second on object storage (a
        request each)."""
        interval = 0.2 if run.is_local else 1.0
        return Throttled(StoreWeights(cache, current, lease), interval_s=interval)

    def durable(self, version: int) -> bool:
        return True
