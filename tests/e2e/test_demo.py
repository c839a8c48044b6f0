"""The learning demo, shortened: bench/demo_learning.py drives the whole tiny-cpu path (warm-started
model, generators, trainer, evaluations) and leaves a curve fit; the run's curve plot renders.
Whether the pass rate climbs enough is the benchmark's business (bench/results/demo.json)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "demo_learning.py"


def _bench():
    # Benchmarks run as scripts, with bench/ on sys.path for their shared `common` module.
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("demo_learning", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_demo_fits_a_curve_and_plots_it(tmp_path, prefect_harness):
    from scalerl.config import load_config
    from scalerl.plots import PIXELS, plot_curve
    from scalerl.scaling import fit_sigmoid
    from storage import open_store

    out = tmp_path / "demo.json"
    # The preset's own data and held-out set, as `make demo` runs it.
    overrides = [
        "schedule.max_steps=4",
        "evaluation.every_steps=1",
        "evaluation.samples_per_prompt=2",
    ]
    args = ["--storage", str(tmp_path), "--out", str(out)]
    report = _bench().main([*args, *[f"--set={o}" for o in overrides]])
    assert json.loads(out.read_text()) == report
    assert report["trainer_steps"] == 4
    curve = report["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2, 3, 4]
    cfg = load_config(preset="tiny-cpu", overrides=overrides)
    assert (report["data"], report["eval_prompts"]) == (cfg.data.source, cfg.data.num_eval_prompts)
    for p in curve:  # compute axis: samples = step x prompts x samples per prompt
        assert p["compute"] == p["step"] * cfg.completions_per_batch
        assert 0.0 <= p["pass_rate"] <= 1.0
    fit = report["fit"]
    assert fit["n_points"] == 4 and fit["R0"] == curve[0]["pass_rate"]
    assert report["start_pass_rate"] == curve[0]["pass_rate"]
    assert report["final_pass_rate"] == curve[-1]["pass_rate"]
    # the fitted sigmoid reproduces its own residual on the points it was fitted to
    refit = fit_sigmoid(
        [p["compute"] for p in curve[1:]], [p["pass_rate"] for p in curve[1:]],
        R0=fit["R0"], exclude_fraction=0.0, bootstrap=0,
    )  # fmt: skip
    resid = sum((refit.predict(p["compute"]) - p["pass_rate"]) ** 2 for p in curve[1:])
    assert resid == pytest.approx(refit.residual, abs=1e-9)
    run = open_store(str(tmp_path / "runs")).run(report["run_id"])
    assert run.read_status()["state"] == "finished"
    png = plot_curve(
        [p["compute"] for p in curve], [p["pass_rate"] for p in curve], refit, tmp_path / "c.png"
    )
    from PIL import Image

    assert Image.open(png).size == PIXELS
