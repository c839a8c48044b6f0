"""What every benchmark script reports beside its numbers: the machine, and the JSON output.

Imported as `from common import machine, emit` by scripts run as `python bench/NAME.py`."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_end": os.getloadavg()[0],
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def emit(report: dict, out: str | None) -> dict:
    """Print the report as JSON, and also write it to `out` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
    return report
