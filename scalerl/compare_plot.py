"""One PNG with the compute curves of several recipes side by side (the paper's Figure 2 style).

    plot_compare({"scalerl": [Curve(compute, pass_rate, fit), ...], "grpo": [...]}, "cmp.png")

Each recipe has one color; every seed is one run: its held-out evaluations as markers joined by
a thin line, and its fitted sigmoid R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) (SCALERL.md
sec. 8) as a smooth curve when the run had enough points to fit. Compute 0 (the starting
policy) cannot sit on a log axis, so the x axis is linear. Built on matplotlib's Agg canvas
(no pyplot, no display), at the size of scalerl.plots.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scalerl.plots import DPI, FIGSIZE, save_png
from scalerl.scaling import SigmoidFit

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


@dataclass(frozen=True)
class Curve:
    """One run's evaluations and (when it could be fitted) its sigmoid."""

    compute: Sequence[float]
    pass_rate: Sequence[float]
    fit: SigmoidFit | None = None


def compare_figure(
    curves: Mapping[str, Sequence[Curve]],
    *,
    compute_unit: str = "compute",
    title: str = "Held-out pass rate vs compute, per recipe",
) -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    for i, (recipe, runs) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        for j, run in enumerate(runs):
            C = np.asarray(run.compute, dtype=float)
            R = np.asarray(run.pass_rate, dtype=float)
            label = recipe if j == 0 else None
            ax.plot(C, R, "o-", color=color, lw=0.8, ms=4, alpha=0.8, label=label)
            if run.fit is not None and (C > 0).any():
                grid = np.linspace(C[C > 0].min(), C.max(), 200)
                ax.plot(grid, run.fit.predict(grid), "-", color=color, lw=2.0, alpha=0.6)
    ax.set_xlabel(f"compute ({compute_unit})")
    ax.set_ylabel("pass rate")
    ax.set_ylim(0.0, 1.0)
    if curves:
        ax.legend(loc="upper left", fontsize="small")
    return fig


def plot_compare(curves: Mapping[str, Sequence[Curve]], path: str | os.PathLike, **kwargs) -> Path:
    """compare_figure(...) saved as a PNG at `path`."""
    return save_png(compare_figure(curves, **kwargs), path)
