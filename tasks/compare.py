"""Recipe comparison at equal compute: the recipes' config changes, and the table + plot task.

    cfg = recipe_config(base, "grpo", seed=1, run_id="cmp-grpo-s1")
    summary = summarize_comparison(base, {"grpo": ["cmp-grpo-s1", ...], ...}, out_dir)

A recipe is the ScaleRL config with one choice swapped for the baseline the paper compared it to
(SCALERL.md sec. 1 and 3). Every recipe x seed keeps the base config's task, batch shape,
lengths and schedule, so all runs spend the same compute (schedule.max_steps x completions per
batch samples); only the seed of sampling and of the trainer changes between seeds, and the
prompts and held-out set stay the same (data.seed is not touched).

The table follows the paper's Table 1: the fitted A, B and C_mid per recipe, as the mean over
seeds with their spread (standard deviation; the paper treats +/-0.02 on A as noise).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from prefect import task

from runtime.common import open_run
from scalerl.config import RunConfig, apply_overrides, validate_config

RECIPES: dict[str, list[str]] = {
    "scalerl": [],
    "grpo": [
        "algorithm.loss={type: grpo}",
        "algorithm.aggregation=sample",
        "algorithm.advantage_normalization=group",
    ],
    "dapo": ["algorithm.loss={type: dapo}", "algorithm.aggregation=token"],
    "no-fp32-head": ["algorithm.fp32_lm_head=false"],
    "sync": ["pipeline.max_off_policy_steps=0"],
}
"""Recipe name -> the dotted overrides that turn the ScaleRL config into it."""

FIT_FIELDS = ("A", "B", "C_mid")


def check_recipes(recipes: list[str]) -> None:
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        raise ValueError(
            f"unknown recipe(s) {unknown or '(none given)'}. Fix: choose from {', '.join(RECIPES)}."
        )


def recipe_config(config: RunConfig, recipe: str, *, seed: int, run_id: str) -> RunConfig:
    """`config` turned into `recipe`, seeded with `seed`, stored under `run_id`."""
    check_recipes([recipe])
    data = apply_overrides(config.model_dump(mode="json"), RECIPES[recipe])
    data["generation"]["seed"] = seed
    data["trainer"]["seed"] = seed
    data["storage"]["run_id"] = run_id
    return validate_config(data)


def _spread(values: list[float]) -> dict[str, float | int | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _fmt(cell: dict, digits: int) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def markdown_table(rows: list[dict], compute_unit: str) -> str:
    lines = [
        f"| recipe | seeds | A | B | C_mid ({compute_unit}) | start pass rate | final pass rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['seeds']} | {_fmt(r['A'], 3)} | {_fmt(r['B'], 2)} | "
            f"{_fmt(r['C_mid'], 0)} | {_fmt(r['start_pass_rate'], 3)} | "
            f"{_fmt(r['final_pass_rate'], 3)} |"
        )
    return "\n".join(lines) + "\n"


@task(name="summarize-comparison", retries=1, cache_policy=None)
def summarize_comparison(
    config: RunConfig, runs: dict[str, list[str]], out_dir: str, fits: dict[str, dict | None]
) -> dict[str, Any]:
    """Table (JSON + markdown) and curve plot of finished runs; `fits` maps run id -> the
    fit_scaling_curve row (None when a run had too few evaluations to fit)."""
    from prefect.artifacts import create_markdown_artifact

    from scalerl.compare_plot import Curve, plot_compare
    from scalerl.scaling import SigmoidFit
    from scalerl.stats import eval_points

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, curves, per_run = [], {}, {}
    for recipe, run_ids in runs.items():
        curves[recipe] = []
        for run_id in run_ids:
            compute, rate, _ = eval_points(open_run(config, run_id).read_metrics("eval"))
            fit = fits.get(run_id)
            sigmoid = (
                SigmoidFit(fit["A"], fit["B"], fit["C_mid"], fit["R0"], fit["residual"],
                           fit["n_points"], (fit["A_low"], fit["A_high"]))
                if fit else None
            )  # fmt: skip
            curves[recipe].append(Curve(compute, rate, sigmoid))
            per_run[run_id] = {
                "recipe": recipe,
                "compute": compute,
                "pass_rate": rate,
                "fit": {k: fit[k] for k in (*FIT_FIELDS, "R0", "residual")} if fit else None,
            }
        fitted = [fits.get(r) for r in run_ids]
        rows.append(
            {
                "recipe": recipe,
                "seeds": len(run_ids),
                **{k: _spread([f[k] if f else None for f in fitted]) for k in FIT_FIELDS},
                "start_pass_rate": _spread(
                    [
                        per_run[r]["pass_rate"][0] if per_run[r]["pass_rate"] else None
                        for r in run_ids
                    ]
                ),  # fmt: skip
                "final_pass_rate": _spread(
                    [
                        per_run[r]["pass_rate"][-1] if per_run[r]["pass_rate"] else None
                        for r in run_ids
                    ]
                ),  # fmt: skip
            }
        )
    unit = config.schedule.compute_unit
    table_md = markdown_table(rows, unit)
    plot = plot_compare(curves, out / "compare.png", compute_unit=unit)
    summary = {
        "compute_unit": unit,
        "compute_per_run": config.schedule.max_steps * config.completions_per_batch,
        "table": rows,
        "runs": per_run,
        "markdown": str(out / "compare.md"),
        "plot": str(plot),
    }
    (out / "compare.md").write_text(table_md, encoding="utf-8")
    (out / "compare.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    create_markdown_artifact(
        markdown=f"## Recipe comparison at equal compute\n\n{table_md}\nPlot: `{plot}`\n",
        description="ScaleRL recipe comparison (A, B, C_mid per recipe, mean ± std over seeds)",
    )
    return summary
