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


def add_model_args(ap) -> None:
    """--layers, --hidden, --heads, --vocab of the bench model (default: the 138M one, a random
    Qwen2 architecture with hidden 768, 12 layers and heads, MLP 3,072, vocabulary 32,000)."""
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32_000)


def build_bench_model(path, args) -> Path:
    """The bench model of add_model_args' arguments, written to `path` (MLP 4 x hidden)."""
    from scalerl.models import build_tiny_model

    return build_tiny_model(
        path,
        hidden_size=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate_size=4 * args.hidden,
        vocab_size=args.vocab,
    )


def emit(report: dict, out: str | None) -> dict:
    """Print the report as JSON, and also write it to `out` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
    return report
