"""scalerl/plots.py: PNGs of the fixed pixel size, and figures that show what they claim (the fitted
sigmoid and its asymptote A, the extrapolation beyond the last point, the interruption window,
the staleness bound k)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import image as mpimg
from PIL import Image

from scalerl.plots import (
    PIXELS,
    curve_figure,
    lengths_figure,
    plot_curve,
    plot_lengths,
    plot_staleness,
    staleness_figure,
)
from scalerl.scaling import SigmoidFit

FIT = SigmoidFit(
    A=0.61, B=1.92, C_mid=2542.0, R0=0.1, residual=0.0, n_points=6, A_interval=(0.6, 0.62)
)
COMPUTE = [0.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0]


def _rate(C):  # the paper's sigmoid, written out
    return FIT.R0 + (FIT.A - FIT.R0) / (1 + (FIT.C_mid / C) ** FIT.B) if C > 0 else FIT.R0


def _line(ax, label_start):
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith(label_start)]
    assert len(lines) == 1, [ln.get_label() for ln in ax.get_lines()]
    return lines[0]


def _assert_png(path):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == PIXELS == (800, 500)
    pixels = mpimg.imread(path)  # (H, W, 4) floats
    assert pixels.shape[:2] == (500, 800)
    assert pixels[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_curve_png_and_content(tmp_path):
    rates = [_rate(c) for c in COMPUTE]
    _assert_png(plot_curve(COMPUTE, rates, FIT, tmp_path / "c.png", target_compute=50_000.0))
    ax = curve_figure(COMPUTE, rates, FIT, target_compute=50_000.0).axes[0]
    assert ax.get_xscale() == "log"
    a_line = _line(ax, "asymptote A")
    assert list(a_line.get_ydata()) == [FIT.A, FIT.A] and a_line.get_linestyle() == "--"
    fitted, ahead = _line(ax, "sigmoid fit"), _line(ax, "extrapolation")
    assert fitted.get_linestyle() == "-" and ahead.get_linestyle() == "--"
    assert fitted.get_xdata().max() == pytest.approx(6000.0)
    assert ahead.get_xdata().min() == pytest.approx(6000.0)
    assert ahead.get_xdata().max() == pytest.approx(50_000.0)  # up to the target compute
    x, y = ahead.get_xdata(), ahead.get_ydata()
    assert y == pytest.approx([_rate(c) for c in x])
    points = _line(ax, "evaluations")
    assert list(points.get_xdata()) == COMPUTE[1:]  # compute 0 cannot sit on a log axis
    star = _line(ax, "predicted")
    assert star.get_ydata()[0] == pytest.approx(_rate(50_000.0))


def test_curve_shows_the_half_run_prediction_and_its_interval():
    half_run = {
        "half_run_prediction": 0.58,
        "half_run_low": 0.52,
        "half_run_high": 0.63,
        "half_run_confidence": 0.9,
    }
    rates = [_rate(c) for c in COMPUTE]
    ax = curve_figure(COMPUTE, rates, FIT, half_run=half_run).axes[0]
    (bar,) = [c for c in ax.containers if c.get_label().startswith("half-run prediction")]
    assert bar.get_label() == "half-run prediction 0.580 [0.520, 0.630] (90%)"
    marker = bar.lines[0]
    assert list(marker.get_xdata()) == [6000.0] and list(marker.get_ydata()) == [0.58]
    (segment,) = bar.lines[2][0].get_segments()  # the error bar: low to high at 6,000
    np.testing.assert_allclose(segment, [[6000.0, 0.52], [6000.0, 0.63]])
    assert list(_line(ax, "half-run fit data end").get_xdata()) == [3000.0, 3000.0]
    # no half-run check (too few points): nothing drawn for it
    ax = curve_figure(COMPUTE, rates, FIT, half_run={"half_run_prediction": None}).axes[0]
    assert not [ln for ln in ax.get_lines() if ln.get_label().startswith("half-run")]
    assert not ax.containers


def test_curve_without_fit_still_renders(tmp_path):
    _assert_png(plot_curve([0.0, 10.0, 20.0], [0.1, 0.2, 0.3], None, tmp_path / "c.png"))


def test_lengths_histogram_marks_the_interruption_window(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 12_000, 300)
    reasons = np.where(
        lengths > 11_900, "length", np.where(lengths > 11_000, "interrupted", "stop")
    )
    _assert_png(plot_lengths(lengths, reasons, tmp_path / "l.png", window=(10_000, 12_000)))
    ax = lengths_figure(lengths, reasons, window=(10_000, 12_000), max_tokens=14_336).axes[0]
    spans = [p for p in ax.patches if p.get_label().startswith("interruption window")]
    assert len(spans) == 1
    span = spans[0]
    assert (span.get_x(), span.get_x() + span.get_width()) == (10_000, 12_000)
    heights = sum(p.get_height() for p in ax.patches if p not in spans)
    assert heights == len(lengths)  # every completion counted once in the stacked bars
    assert list(_line(ax, "max_new_tokens").get_xdata()) == [14_336, 14_336]


def test_staleness_bars_and_bound(tmp_path):
    hist = {0: 700, 1: 50, 2: 12, 3: 0}
    _assert_png(plot_staleness(hist, tmp_path / "s.png", k=8))
    ax = staleness_figure(hist, k=8).axes[0]
    bars = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in ax.patches}
    assert bars == hist
    assert list(_line(ax, "k = 8").get_xdata()) == [8.5, 8.5]


def _visible_x_tick_labels(fig):
    """(text, window bounding box) of every x tick label drawn inside the view (Agg canvas)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    lo, hi = sorted(ax.get_xlim())
    out = []
    for tick in ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks():
        label = tick.label1
        x = tick.get_loc()
        if tick.get_visible() and label.get_visible() and label.get_text() and lo <= x <= hi:
            out.append((label.get_text(), label.get_window_extent(renderer)))
    return out


@pytest.mark.parametrize(
    ("first", "decades", "target"),
    [
        (1500.0, 1.0, None),  # seen: "3x10^3 4x10^3" minor labels on top of each other
        (2000.0, 1.0, None),
        (1500.0, 0.5, 10.0),
        (2000.0, 0.7, 10.0),
        (1000.0, 0.2, None),
        (100.0, 2.0, None),
        (10.0, 4.0, 100.0),
        (1.0, 8.0, None),
        (0.01, 1.5, None),
    ],
)
def test_curve_x_tick_labels_never_overlap(first, decades, target):
    compute = [0.0, *np.geomspace(first, first * 10**decades, 6)]
    rates = [_rate(c) for c in compute]
    target_compute = compute[-1] * target if target else None
    fig = curve_figure(compute, rates, FIT, target_compute=target_compute)
    labels = _visible_x_tick_labels(fig)
    assert len(labels) >= 2, labels  # the axis can still be read
    for i, (text_a, box_a) in enumerate(labels):
        for text_b, box_b in labels[i + 1 :]:
            assert not box_a.overlaps(box_b), (text_a, text_b)
