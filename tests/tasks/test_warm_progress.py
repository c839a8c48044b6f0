"""The one-off warm start of builtin:tiny-warm says what it is doing while it runs (make demo on a
fresh machine spends minutes there): a first line, then step counts with the time left."""

import dataclasses
import logging

from runtime.common import _warm_progress
from scalerl.warmstart import WarmStartSpec, warm_start_tiny


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_warm_start_logs_its_progress(tmp_path):
    spec = dataclasses.replace(WarmStartSpec(), steps=3)
    logger, handler = logging.getLogger("scalerl.warmstart"), _Lines()
    logger.addHandler(handler)  # (Prefect's logging set-up keeps these records from caplog)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        warm_start_tiny(tmp_path / "m", spec=spec, log=_warm_progress(spec, tmp_path / "cache"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = handler.lines
    assert lines[0].startswith("building builtin:tiny-warm once: 3 supervised steps")
    # warm_start_tiny reports every 100th step and the last one: steps 1 and 3 of 3
    assert [line.split(",")[0] for line in lines[1:]] == [
        "warm start: step 1/3 (33%)",
        "warm start: step 3/3 (100%)",
    ]
    assert lines[-1].endswith("about 0 s left")
