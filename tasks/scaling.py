"""fit_scaling_curve: the ScaleRL sigmoid on the run's held-out pass rates, with a half-run check.

Reads the `eval` metrics (one row per evaluated policy version: compute, pass_rate), fits
R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) with R0 the pass rate of version 0, and, to show the
curve is predictive, fits again on the first half of the compute range and predicts the last
point with a 90% prediction interval (scalerl.scaling.predict_sigmoid: the fit's uncertainty
at the end plus the noise of one evaluation, with Student's t). Appends one row to the
`scaling` metrics; returns it (None while too few points exist).
"""

from __future__ import annotations

import time

from prefect import get_run_logger, task

from runtime.common import open_run
from scalerl.config import RunConfig

HALF_RUN_CONFIDENCE = 0.9


def describe_half_run(fit: dict) -> str | None:
    """One line: "predicted 0.835 [0.778, 0.886] (nominal 90% interval) at the end from the
    first half; observed 0.839 (error 0.004, inside the interval)"."""
    if fit.get("half_run_prediction") is None:
        return None
    text = f"predicted {fit['half_run_prediction']:.3f}"
    if fit.get("half_run_low") is not None:
        share = round(100 * fit["half_run_confidence"])
        text += (
            f" [{fit['half_run_low']:.3f}, {fit['half_run_high']:.3f}] (nominal {share}% interval)"
        )
    text += f" at the end from the first half; observed {fit['final_pass_rate']:.3f}"
    text += f" (error {fit['half_run_error']:.3f}"
    if fit.get("half_run_inside") is not None:
        text += ", inside the interval" if fit["half_run_inside"] else ", OUTSIDE the interval"
    return text + ")"


@task(name="fit-scaling-curve", retries=1, timeout_seconds=600)
def fit_scaling_curve(config: RunConfig, run_id: str) -> dict | None:
    from scalerl.scaling import MIN_POINTS, fit_sigmoid, predict_sigmoid
    from scalerl.stats import eval_points

    logger = get_run_logger()
    run = open_run(config, run_id)
    compute, rate, steps = eval_points(run.read_metrics("eval"))
    if not compute or compute[0] != 0.0:
        logger.info("no evaluation of version 0 yet: nothing to fit")
        return None
    C, R, R0 = compute[1:], rate[1:], rate[0]
    if len(C) < MIN_POINTS:
        logger.info("%d evaluation point(s) after version 0; the fit needs %d", len(C), MIN_POINTS)
        return None
    fit = fit_sigmoid(C, R, R0=R0, exclude_fraction=0.0, bootstrap=100, seed=config.data.seed)
    row = {
        "step": steps[-1],
        "time": time.time(),  # when it was fitted (the trackers' clock for this row)
        "compute": C[-1],
        "compute_unit": config.schedule.compute_unit,
        "A": fit.A,
        "B": fit.B,
        "C_mid": fit.C_mid,
        "R0": fit.R0,
        "residual": fit.residual,
        "A_low": fit.A_interval[0],
        "A_high": fit.A_interval[1],
        "n_points": fit.n_points,
        "at_grid_edge": fit.at_grid_edge,
        "final_pass_rate": R[-1],
        "half_run_prediction": None,
        "half_run_low": None,
        "half_run_high": None,
        "half_run_confidence": None,
        "half_run_inside": None,
        "half_run_error": None,
        "half_run_points": None,
        "half_run_residual_sd": None,
        "half_run_fit_se": None,
    }
    half = [i for i, c in enumerate(C) if c <= C[-1] / 2]
    if len(half) >= MIN_POINTS:
        early = predict_sigmoid(
            [C[i] for i in half],
            [R[i] for i in half],
            C[-1],
            R0=R0,
            exclude_fraction=0.0,
            confidence=HALF_RUN_CONFIDENCE,
        )
        row |= {
            "half_run_prediction": early.value,
            "half_run_low": early.low,
            "half_run_high": early.high,
            "half_run_confidence": early.confidence,
            "half_run_inside": early.contains(R[-1]),
            "half_run_error": abs(early.value - R[-1]),
            "half_run_points": len(half),
            "half_run_residual_sd": early.residual_sd,
            "half_run_fit_se": early.fit_se,
        }
    run.append_metrics("scaling", [row])
    logger.info(
        "sigmoid fit: A=%.3f B=%.2f C_mid=%.4g R0=%.3f (%d points)",
        fit.A,
        fit.B,
        fit.C_mid,
        fit.R0,
        fit.n_points,
    )
    if (line := describe_half_run(row)) is not None:
        logger.info("half-run check: %s", line)
    return row
