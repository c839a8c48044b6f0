"""PNG plots of a run: the compute curve with its fitted sigmoid, completion lengths, staleness.

    plot_curve(compute, pass_rate, fit, "curve.png", compute_unit="samples")
    fig = curve_figure(compute, pass_rate, fit)     # the matplotlib Figure, to inspect or embed
    plot_lengths(lengths, finish_reasons, "lengths.png", window=(10_000, 12_000))
    plot_staleness({0: 700, 1: 60, 2: 8}, "staleness.png", k=8)

Every figure is FIGSIZE inches at DPI dots per inch, i.e. PIXELS = (800, 500) pixels, saved
without tight bounding boxes so the size never depends on the labels. Figures are built on
matplotlib's Agg canvas directly (no pyplot), so no global backend is switched and nothing
needs a display. The curve is the paper's R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B)
(SCALERL.md sec. 8) on a log compute axis, as in the paper's figures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from scalerl.scaling import SigmoidFit

FIGSIZE = (8.0, 5.0)
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
EXTRAPOLATE = 4.0  # draw the fitted curve to this multiple of the last compute point
REASON_COLORS = {"stop": "tab:green", "interrupted": "tab:orange", "length": "tab:red"}


def _figure(title: str):
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


class ReadableLogLocator(LogLocator):
    """Major ticks of a log axis, as many as fit: 1..9, then 1, 2, 3, 5, then 1, 2, 5 times
    each power of ten as the range widens, only powers of ten beyond 2.5 decades. Paired with
    ``tick_label`` and unlabelled minor ticks, so no two tick labels overlap."""

    def __call__(self):
        vmin, vmax = sorted(self.axis.get_view_interval())
        decades = np.log10(vmax / vmin) if vmin > 0 else np.inf
        if decades < 0.4:
            subs: Any = np.arange(1.0, 10.0)
        elif decades < 1.0:
            subs = (1.0, 2.0, 3.0, 5.0)
        elif decades <= 2.5:
            subs = (1.0, 2.0, 5.0)
        else:
            subs = (1.0,)
        self.set_params(subs=subs, numticks=8)
        return super().__call__()


def tick_label(x: float, _pos: Any = None) -> str:
    """Short plain labels: 500, 2000, 0.05, and 2e6 / 1e-4 for very large / small values."""
    if x <= 0:
        return f"{x:g}"
    if 1.0 <= x < 1e6:
        return f"{x:.0f}" if abs(x - round(x)) < 1e-6 * x else f"{x:.4g}"
    if 1e-3 <= x < 1.0:
        return f"{x:.4g}"
    exp = int(np.floor(np.log10(x)))
    mant = x / 10.0**exp
    if round(mant, 3) >= 10:  # rounding pushed it to the next power
        mant, exp = mant / 10, exp + 1
    return f"{mant:.3g}e{exp}"


def _readable_log_x(ax) -> None:
    """Log x-axis whose tick labels never overlap (no minor labels; ReadableLogLocator)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ReadableLogLocator(base=10.0))
    ax.xaxis.set_major_formatter(FuncFormatter(tick_label))
    ax.xaxis.set_minor_formatter(NullFormatter())


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG of exactly PIXELS (no tight bounding box)."""
    out = Path(path)
    fig.savefig(out, format="png", dpi=DPI)
    return out


def curve_figure(
    compute: Sequence[float],
    pass_rate: Sequence[float],
    fit: SigmoidFit | None,
    *,
    target_compute: float | None = None,
    compute_unit: str = "compute",
    title: str = "Held-out pass rate vs compute",
    half_run: Mapping[str, Any] | None = None,
) -> Figure:
    """Evaluation points, the fitted sigmoid (solid over the data, dashed beyond the last
    point), its asymptote A (dashed line, with the A interval shaded) and R0. Points at
    compute 0 cannot sit on a log axis: they appear as the R0 line. ``half_run`` (a scaling
    row of tasks/scaling.py with half_run_prediction, _low, _high): the prediction made from
    the first half, drawn at the last point's compute with its interval as an error bar."""
    C, R = np.asarray(compute, dtype=float), np.asarray(pass_rate, dtype=float)
    fig, ax = _figure(title)
    pos = C > 0
    ax.plot(C[pos], R[pos], "o", color="tab:blue", label="evaluations", zorder=3)
    if fit is not None and pos.any():
        c_lo, c_last = C[pos].min(), C[pos].max()
        c_end = max(c_last * EXTRAPOLATE, target_compute or 0.0)
        seen = np.geomspace(c_lo, c_last, 200)
        ahead = np.geomspace(c_last, c_end, 200)
        ax.plot(seen, fit.predict(seen), "-", color="tab:purple", label="sigmoid fit")
        ax.plot(ahead, fit.predict(ahead), "--", color="tab:purple", label="extrapolation")
        ax.axhline(fit.A, ls="--", color="tab:red", label=f"asymptote A = {fit.A:.3f}")
        lo, hi = fit.A_interval
        if np.isfinite(lo) and np.isfinite(hi):
            ax.axhspan(
                lo, hi, color="tab:red", alpha=0.12, label=f"A interval [{lo:.3f}, {hi:.3f}]"
            )
        ax.axhline(fit.R0, ls=":", color="gray", label=f"R0 = {fit.R0:.3f}")
        if target_compute:
            y = fit.predict(target_compute)
            ax.plot([target_compute], [y], "*", ms=12, color="black", label=f"predicted {y:.3f}")
        _draw_half_run(ax, half_run, c_last)
        ax.text(
            0.02,
            0.97,
            f"B = {fit.B:.2f}, C_mid = {fit.C_mid:.4g}",
            transform=ax.transAxes,
            va="top",
        )
    elif (~pos).any():
        ax.axhline(R[~pos][0], ls=":", color="gray", label=f"R0 = {R[~pos][0]:.3f}")
    if pos.any():
        _readable_log_x(ax)
    ax.set_xlabel(f"compute ({compute_unit})")
    ax.set_ylabel("pass rate")
    ax.set_ylim(0.0, 1.0)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _draw_half_run(ax, half_run: Mapping[str, Any] | None, c_last: float) -> None:
    """The half-run prediction at the last compute, its interval as an error bar, and a
    dotted line where its fit's data end (half the compute)."""
    if not half_run or half_run.get("half_run_prediction") is None:
        return
    y = float(half_run["half_run_prediction"])
    lo, hi = half_run.get("half_run_low"), half_run.get("half_run_high")
    label = f"half-run prediction {y:.3f}"
    err = None
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        err = [[y - lo], [hi - y]]
        share = round(100 * float(half_run.get("half_run_confidence") or 0.9))
        label += f" [{lo:.3f}, {hi:.3f}] ({share}%)"
    ax.errorbar(
        [c_last], [y], yerr=err, fmt="D", ms=7, color="tab:green", capsize=6, zorder=4,
        label=label,
    )  # fmt: skip
    ax.axvline(c_last / 2, ls=":", color="tab:green", alpha=0.6, label="half-run fit data end")


def lengths_figure(
    lengths: Sequence[float],
    finish_reasons: Sequence[str],
    *,
    window: tuple[int, int] | None = None,
    max_tokens: int | None = None,
    bins: int = 50,
    title: str = "Completion lengths",
) -> Figure:
    """Histogram of completion lengths, stacked by finish reason, with the interruption window
    [thinking_budget_min, thinking_budget_max] shaded and the generation budget marked."""
    x = np.asarray(lengths, dtype=float)
    reasons = np.asarray(finish_reasons, dtype=object)
    fig, ax = _figure(title)
    right = max([x.max() if len(x) else 1.0, *(window or ()), max_tokens or 0.0]) * 1.02
    edges = np.linspace(0.0, right, max(1, min(bins, int(right))) + 1)  # >= 1 token per bin
    parts = [(r, x[reasons == r]) for r in REASON_COLORS if (reasons == r).any()]
    if parts:
        ax.hist(
            [p[1] for p in parts],
            bins=edges,
            stacked=True,
            color=[REASON_COLORS[p[0]] for p in parts],
            label=[f"{p[0]} ({len(p[1])})" for p in parts],
        )
    if window is not None:
        ax.axvspan(
            window[0], window[1], color="tab:orange", alpha=0.15,
            label=f"interruption window [{window[0]}, {window[1]}]",
        )  # fmt: skip
    if max_tokens:
        ax.axvline(max_tokens, ls="--", color="tab:red", label=f"max_new_tokens {max_tokens}")
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("completions")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def staleness_figure(
    histogram: Mapping[int, int],
    *,
    k: int | None = None,
    title: str = "Staleness of trained samples",
) -> Figure:
    """Bar chart of samples trained at each staleness d = step - min_version, with the bound k."""
    fig, ax = _figure(title)
    d = np.array(sorted(histogram), dtype=int)
    counts = np.array([histogram[i] for i in d], dtype=float)
    ax.bar(d, counts, color="tab:blue", label="samples")
    if k is not None:
        ax.axvline(k + 0.5, ls="--", color="tab:red", label=f"k = {k} (older is dropped)")
    ax.set_xlabel("staleness (trainer step - oldest policy version of the completion)")
    ax.set_ylabel("samples")
    if len(d):
        ax.set_xticks(np.arange(0, max(d.max(), k or 0) + 1))
    ax.legend(loc="upper right", fontsize="small")
    return fig


def plot_curve(
    compute: Sequence[float],
    pass_rate: Sequence[float],
    fit: SigmoidFit | None,
    path: str | os.PathLike,
    **kwargs: Any,
) -> Path:
    """curve_figure(...) saved as a PNG at `path`."""
    return save_png(curve_figure(compute, pass_rate, fit, **kwargs), path)


def plot_lengths(
    lengths: Sequence[float],
    finish_reasons: Sequence[str],
    path: str | os.PathLike,
    **kwargs: Any,
) -> Path:
    """lengths_figure(...) saved as a PNG at `path`."""
    return save_png(lengths_figure(lengths, finish_reasons, **kwargs), path)


def plot_staleness(histogram: Mapping[int, int], path: str | os.PathLike, **kwargs: Any) -> Path:
    """staleness_figure(...) saved as a PNG at `path`."""
    return save_png(staleness_figure(histogram, **kwargs), path)
