"""Imported once by the fork server of runtime/isolated.py after runtime/preload.py (tasks/__init__.py
adds it): the task modules whose bodies run in children (the plots of tasks/report.py), and
Prefect with them."""

import tasks.evaluate  # noqa: F401
import tasks.report  # noqa: F401
import tasks.rollouts  # noqa: F401
import tasks.train  # noqa: F401
