"""The shared scoring pools (one per worker count, started on first use, stopped at exit) and
what a worker's outcome becomes: a Reward. Apart from scalerl/rewards/__init__.py so that a
scorer can use a pool without importing the package that registers it."""

from __future__ import annotations

import atexit
import threading

from scalerl.rewards.base import Reward, wrong
from scalerl.rewards.sandbox import Outcome, ScoringPool

_pools: dict[int | None, ScoringPool] = {}
_pools_lock = threading.Lock()


def default_pool(workers: int | None = None) -> ScoringPool:
    """The shared pool for this worker count, started on first use."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None or pool.closed:
            pool = _pools[workers] = ScoringPool(workers)
        return pool


def close_default_pools() -> None:
    """Stop the shared pools' workers (they restart on the next call)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()


atexit.register(close_default_pools)


def to_reward(outcome: Outcome) -> Reward:
    if outcome.ok:
        value = outcome.value
        if isinstance(value, Reward):
            return value
        return wrong(f"error: scorer returned {type(value).__name__}, not a Reward")
    return wrong(f"{outcome.failure}: {outcome.detail}")
