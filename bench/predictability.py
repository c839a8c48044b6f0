"""Is the half-run prediction right, and is its interval honest? N tiny-cpu runs over seeds.

    .venv/bin/python bench/predictability.py --out bench/results/predictability.json
    .venv/bin/python bench/predictability.py --seeds 0,1 --set schedule.max_steps=100  # smoke

Runs `scalerl_run` on the tiny-cpu preset (what `make demo` runs) once per seed, one after the
other, each in a fresh run store. A seed sets generation.seed and trainer.seed (the sampling of
every rollout and the trainer's randomness); data.seed stays the preset's, so every run starts
from the same shipped warm model (scalerl/assets/tiny-warm) and is evaluated on the same 128
held-out prompts x 8 samples. Each run ends with tasks/scaling.py's half-run check: the sigmoid
fitted on the evaluations up to half the compute predicts the last evaluation, with a 90%
delta-method prediction interval (scalerl.scaling.predict_sigmoid: the fit's uncertainty at the
end plus one evaluation's noise, Student t).

Prints one JSON object: per run the start and final pass rates, the prediction, its interval,
the error and whether the observed final fell inside; over runs the median and max |error|, the
share inside, and the half-widths. Per run it also records what could make the curve sag at the
end (the issue-22 question), per quarter of the run: the mean staleness of trained samples, the
CISPO importance-ratio maximum and truncated share, the learning rate, the gradient norm, the
policy's entropy estimated from its own sampled tokens (mean -log p over the raw shards'
completion tokens), the prompts the curriculum has retired, and the curve's residuals against
the evaluation's own sampling error (pass_rate_se).

Goals (issue 22, 2 CPU cores): over 5 seeds median |error| <= 0.03, max <= 0.05, the observed
final inside the 90% interval in >= 4 of 5, half-width <= 0.06.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import emit, machine

GOALS = {
    "median_abs_error_at_most": 0.03,
    "max_abs_error_at_most": 0.05,
    "inside_at_least": 4,
    "half_width_at_most": 0.06,
}


def quarters(max_step: int) -> list[tuple[int, int]]:
    """[(first step, last step)] of the run's four quarters."""
    edges = [round(max_step * q / 4) for q in range(5)]
    return [(edges[i] + 1, edges[i + 1]) for i in range(4)]


def diagnostics(run, config) -> dict:
    """Per quarter of the run: trainer metrics, entropy estimate, retired prompts; and the
    curve's scatter around its full-run fit against the evaluations' sampling error."""
    import numpy as np
    import pyarrow.compute as pc

    from scalerl.scaling import fit_sigmoid

    trainer = run.read_metrics("trainer").to_pandas().sort_values("step")
    k = config.pipeline.max_off_policy_steps
    counts = np.stack([trainer[f"staleness/{d}"].fillna(0).to_numpy() for d in range(k + 1)])
    trainer["staleness_mean"] = (np.arange(k + 1)[:, None] * counts).sum(0) / np.maximum(
        counts.sum(0), 1
    )
    # entropy of the sampling policy, estimated by the mean of -log p over the tokens it drew
    nll_by_version: dict[int, list[float]] = {}
    for shard in run.list_shards("raw"):
        table = run.read_shard("raw", shard.key).select(["logprobs", "max_version"])
        flat = pc.list_flatten(table["logprobs"]).to_numpy(zero_copy_only=False)
        nll_by_version.setdefault(int(pc.max(table["max_version"]).as_py()), []).append(
            float(-flat.mean())
        )
    per_quarter = []
    for lo, hi in quarters(config.schedule.max_steps):
        rows = trainer[(trainer.step >= lo) & (trainer.step <= hi)]
        nll = [x for v, xs in nll_by_version.items() if lo - 1 <= v < hi for x in xs]
        try:
            retired = len(run.load_curriculum(hi)[1]["sampler"]["retired"])
        except Exception:  # noqa: BLE001 - no curriculum committed for that version
            retired = None
        per_quarter.append(
            {
                "steps": [lo, hi],
                "staleness_mean": round(float(rows.staleness_mean.mean()), 3),
                "ratio_max_mean": round(float(rows["loss/ratio_max"].mean()), 3),
                "truncated_fraction": round(float(rows["loss/truncated_fraction"].mean()), 5),
                "lr": float(rows.lr.mean()),
                "grad_norm": round(float(rows.grad_norm.mean()), 3),
                "train_pass_rate": round(float(rows.pass_rate.mean()), 3),
                "samples_kept": round(float(rows.samples_kept.mean()), 1),
                "entropy_estimate_nats": round(statistics.fmean(nll), 4) if nll else None,
                "retired_prompts": retired,
            }
        )
    evals = run.read_metrics("eval").to_pandas().sort_values("step")
    C, R = evals.compute.to_numpy()[1:], evals.pass_rate.to_numpy()[1:]
    full = fit_sigmoid(C, R, R0=float(evals.pass_rate.iloc[0]), exclude_fraction=0.0, bootstrap=0)
    resid = R - full.predict(C)
    second_half = C[-1] / 2 < C
    se = evals.pass_rate_se.to_numpy()[1:] if "pass_rate_se" in evals else None
    return {
        "quarters": per_quarter,
        "full_fit_residual_sd": round(float(resid.std(ddof=3)), 4),
        "second_half_residual_sd": round(float(resid[second_half].std(ddof=1)), 4),
        "eval_sampling_se_mean": round(float(np.mean(se)), 4) if se is not None else None,
        "final_residual": round(float(resid[-1]), 4),
        "last_quarter_mean_residual": round(float(resid[0.75 * C[-1] < C].mean()), 4),
        "lag1_residual_autocorrelation": round(float(np.corrcoef(resid[:-1], resid[1:])[0, 1]), 3),
    }


def one_run(seed: int, args, root: Path) -> dict:
    from flows.run import scalerl_run
    from runtime.common import open_run
    from scalerl.config import load_config
    from scalerl.stats import eval_points

    config = load_config(
        preset=args.preset,
        overrides=[
            f"storage.url={root / f'seed{seed}'}",
            f"generation.seed={seed}",
            f"trainer.seed={seed}",
            *args.overrides,
        ],
    )
    start = time.perf_counter()
    result = scalerl_run(config)
    wall = time.perf_counter() - start
    run = open_run(config, result["run_id"])
    compute, rate, steps = eval_points(run.read_metrics("eval"))
    fit = result.get("fit") or {}
    out = {
        "seed": seed,
        "run_id": result["run_id"],
        "steps": result.get("step"),
        "wall_s": round(wall, 1),
        "start_pass_rate": rate[0],
        "final_pass_rate": rate[-1],
        "predicted": fit.get("half_run_prediction"),
        "interval": [fit.get("half_run_low"), fit.get("half_run_high")],
        "half_width": None,
        "error": None,
        "inside": fit.get("half_run_inside"),
        "half_run_points": fit.get("half_run_points"),
        "curve": [round(r, 4) for r in rate],
        "curve_steps": steps,
    }
    if out["predicted"] is not None:
        out["error"] = round(out["predicted"] - rate[-1], 4)
        out["half_width"] = round((fit["half_run_high"] - fit["half_run_low"]) / 2, 4)
    out["diagnostics"] = diagnostics(run, config)
    return out


def summarize(runs: list[dict]) -> dict:
    scored = [r for r in runs if r["error"] is not None]
    errors = [abs(r["error"]) for r in scored]
    widths = [r["half_width"] for r in scored]
    inside = sum(bool(r["inside"]) for r in scored)
    summary = {
        "runs": len(runs),
        "with_prediction": len(scored),
        "median_abs_error": round(statistics.median(errors), 4) if errors else None,
        "max_abs_error": round(max(errors), 4) if errors else None,
        "mean_signed_error": round(statistics.fmean(r["error"] for r in scored), 4)
        if scored
        else None,
        "inside_interval": inside,
        "median_half_width": round(statistics.median(widths), 4) if widths else None,
        "max_half_width": round(max(widths), 4) if widths else None,
    }
    summary["goals_met"] = {
        "median_abs_error": errors != [] and summary["median_abs_error"] <= GOALS["median_abs_error_at_most"],
        "max_abs_error": errors != [] and summary["max_abs_error"] <= GOALS["max_abs_error_at_most"],
        "inside": scored != [] and inside >= GOALS["inside_at_least"] / 5 * len(scored),
        "half_width": widths != [] and summary["max_half_width"] <= GOALS["half_width_at_most"],
    }  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="Comma-separated seeds.")
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--storage", help="Where the run stores go (default: a temp folder).")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds takes integers separated by commas, got {args.seeds!r}")
    if not seeds:
        parser.error("--seeds is empty. Fix: e.g. --seeds 0,1,2,3,4")
    root = Path(args.storage or tempfile.mkdtemp(prefix="scalerl-predictability-"))
    runs = []
    for seed in seeds:
        runs.append(one_run(seed, args, root))
        print(
            f"seed {seed}: predicted {runs[-1]['predicted']} {runs[-1]['interval']}, "
            f"observed {runs[-1]['final_pass_rate']:.4f}",
            file=sys.stderr,
            flush=True,
        )
    report = {
        "bench": "predictability",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "preset": args.preset,
        "overrides": args.overrides,
        "seeds": seeds,
        "seed_sets": ["generation.seed", "trainer.seed"],
        "interval": "nominal 90% delta-method prediction interval with Student t "
        "(scalerl.scaling.predict_sigmoid)",
        "summary": summarize(runs),
        "goals": GOALS,
        "runs": runs,
        "machine": machine(),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
