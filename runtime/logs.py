"""Where the runtime layer logs: the Prefect run logger inside a task or flow run (the tasks
layer registers it, so this layer imports no Prefect), else a plain logger (an isolated
child, a torchrun rank, a test).

    from runtime.logs import task_logger
    task_logger().info("...")
"""

from __future__ import annotations

import logging
from collections.abc import Callable

_run_logger: Callable[[], logging.Logger | logging.LoggerAdapter | None] | None = None


def use_run_logger(get: Callable[[], logging.Logger | logging.LoggerAdapter | None]) -> None:
    """Register `get`: the run logger of the current task or flow run, or None outside one
    (tasks/__init__.py registers Prefect's)."""
    global _run_logger
    _run_logger = get


def task_logger(name: str = "scalerl.task") -> logging.Logger | logging.LoggerAdapter:
    """The registered run logger inside a task or flow run; `logging.getLogger(name)` elsewhere."""
    if _run_logger is not None:
        found = _run_logger()
        if found is not None:
            return found
    return logging.getLogger(name)
