"""Prefect tasks: thin wrappers over the runtime layer (runtime/), owning retries, timeouts,
artifacts and logging. Importing this package gives the runtime layer Prefect's run logger
and adds the task modules to what the fork server preloads."""

from runtime import isolated as _isolated
from runtime import logs as _logs


def _prefect_run_logger():
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return None


_logs.use_run_logger(_prefect_run_logger)
if "tasks.isolated_preload" not in _isolated.PRELOAD:
    _isolated.PRELOAD.append("tasks.isolated_preload")
