"""The run's half-run check: the prediction from the first half of the compute comes with a
90% interval, lands in the scaling metrics, the report and the CLI line; the evaluation rows
carry their own sampling error."""

import math

import numpy as np
import pytest
from prefect import flow

from runtime.common import open_run
from runtime.evaluation import sampling_se
from scalerl.config import load_config
from tasks.scaling import describe_half_run, fit_scaling_curve


def curve(C, A, B, C_mid, R0):
    return R0 + (A - R0) / (1.0 + (C_mid / C) ** B)


def test_sampling_se_is_the_within_prompt_formula():
    # prompt a: 3 of 4 passed, b: 0 of 2, c: one sample (no within-prompt variance estimate)
    ids = ["a", "a", "a", "a", "b", "b", "c"]
    passed = [1, 0, 1, 1, 0, 0, 1]
    # var = sum_i q_i (1 - q_i) / (s_i - 1) / n^2 = (0.75 * 0.25 / 3 + 0 + 0) / 9
    assert sampling_se(ids, passed) == pytest.approx(math.sqrt(0.75 * 0.25 / 3 / 9))
    # 128 prompts x 8 samples all at q = 0.5: sqrt(128 * 0.25 / 7) / 128
    ids = [f"p{i}" for i in range(128) for _ in range(8)]
    passed = [j % 2 for _ in range(128) for j in range(8)]
    assert sampling_se(ids, passed) == pytest.approx(math.sqrt(128 * 0.25 / 7) / 128)
    # one sample per prompt: no within-prompt variance to estimate from
    assert sampling_se(["a", "b"], [1, 0]) is None


def test_fit_task_records_the_half_run_interval(prefect_harness, tmp_path):
    cfg = load_config(preset="tiny-cpu", overrides=[f"storage.url={tmp_path / 'runs'}"])
    run = open_run(cfg, "r1", create=True)
    rng = np.random.default_rng(4)
    steps = np.arange(0, 520, 20)
    compute = steps * 128.0
    rate = np.concatenate([[0.07], curve(compute[1:], 0.86, 1.5, 10_000.0, 0.07)])
    rate[1:] += rng.normal(0.0, 0.02, len(rate) - 1)
    run.append_metrics(
        "eval",
        [
            {"step": int(s), "version": int(s), "compute": float(c), "pass_rate": float(r)}
            for s, c, r in zip(steps, compute, rate, strict=True)
        ],
    )

    @flow
    def fit_it():
        return fit_scaling_curve(cfg, "r1")

    row = fit_it()
    half = int(np.sum(compute[1:] <= compute[-1] / 2))  # 12: up to 30,720 of 64,000 samples
    assert row["half_run_points"] == half == 12
    assert row["half_run_low"] < row["half_run_prediction"] < row["half_run_high"]
    assert row["half_run_confidence"] == 0.9
    assert row["half_run_error"] == pytest.approx(abs(row["half_run_prediction"] - rate[-1]))
    assert row["half_run_inside"] == (row["half_run_low"] <= rate[-1] <= row["half_run_high"])
    stored = run.read_metrics("scaling").to_pylist()[-1]
    assert stored["half_run_low"] == row["half_run_low"]
    line = describe_half_run(row)
    assert line.startswith(
        f"predicted {row['half_run_prediction']:.3f} "
        f"[{row['half_run_low']:.3f}, {row['half_run_high']:.3f}] (nominal 90% interval)"
    )
    assert f"observed {rate[-1]:.3f}" in line


def test_describe_reads_rows_without_an_interval():
    """Scaling rows written before the interval existed still print."""
    old = {"half_run_prediction": 0.8, "final_pass_rate": 0.75, "half_run_error": 0.05}
    assert describe_half_run(old) == (
        "predicted 0.800 at the end from the first half; observed 0.750 (error 0.050)"
    )
    assert describe_half_run({"half_run_prediction": None}) is None
    outside = {
        **old,
        "half_run_low": 0.78,
        "half_run_high": 0.82,
        "half_run_confidence": 0.9,
        "half_run_inside": False,
    }
    assert describe_half_run(outside).endswith("(error 0.050, OUTSIDE the interval)")
