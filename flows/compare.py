"""Recipes side by side at equal compute: one scalerl_run per recipe x seed, then a table and a plot.

    from flows.compare import scalerl_compare
    scalerl_compare(load_config(preset="tiny-cpu"), ["scalerl", "grpo"], [0, 1])
    # or, from a shell: python -m flows.compare --preset tiny-cpu --recipes scalerl,grpo --seeds 0,1

Recipes (tasks/compare.py RECIPES): scalerl (the config as is), grpo, dapo, no-fp32-head, sync.
Runs are sequential subflows under the same storage root, with run ids
`{compare_id}-{recipe}-s{seed}`; calling again with the same compare_id resumes (finished runs
are skipped by scalerl_run's own idempotency). Output: compare.json, compare.md (the paper's
Table 1 shape: A, B, C_mid per recipe, mean ± std over seeds) and compare.png in `out_dir`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow

from flows.run import scalerl_run
from runtime.common import new_run_id
from scalerl.config import RunConfig, load_config
from tasks.compare import RECIPES, check_recipes, recipe_config, summarize_comparison


@flow(name="scalerl-compare", log_prints=True)
def scalerl_compare(
    config: RunConfig,
    recipes: list[str],
    seeds: list[int],
    compare_id: str | None = None,
    out_dir: str | None = None,
) -> dict:
    """Run every recipe x seed on `config`'s task and budget; returns the comparison summary."""
    check_recipes(recipes)
    if not seeds:
        raise ValueError("seeds is empty. Fix: pass at least one seed, e.g. [0].")
    compare_id = compare_id or f"cmp-{new_run_id()}"
    runs: dict[str, list[str]] = {r: [] for r in recipes}
    fits: dict[str, dict | None] = {}
    for recipe in recipes:
        for seed in seeds:
            run_id = f"{compare_id}-{recipe}-s{seed}"
            result = scalerl_run(recipe_config(config, recipe, seed=seed, run_id=run_id))
            runs[recipe].append(run_id)
            fits[run_id] = result.get("fit")
    return summarize_comparison(config, runs, out_dir or f"compare/{compare_id}", fits)


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: parse argv, run the comparison, print the summary as JSON."""
    parser = argparse.ArgumentParser(
        prog="scalerl compare", description="Compare recipes at equal compute."
    )
    parser.add_argument("config", nargs="?", help="YAML run configuration.")
    parser.add_argument("--preset", help="Preset to start from (e.g. tiny-cpu).")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="Override, section.field=value (repeatable).")  # fmt: skip
    parser.add_argument("--recipes", default="scalerl,grpo",
                        help=f"Comma-separated, from: {', '.join(RECIPES)}.")  # fmt: skip
    parser.add_argument("--seeds", default="0", help="Comma-separated integer seeds.")
    parser.add_argument("--id", dest="compare_id", help="Comparison id (resume with the same).")
    parser.add_argument("--out", dest="out_dir", help="Output folder (default compare/ID).")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} is not a list of integers. Fix: e.g. --seeds 0,1,2")
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    try:
        check_recipes(recipes)
    except ValueError as exc:
        parser.error(str(exc))
    config = load_config(args.config, preset=args.preset, overrides=args.overrides)
    summary = scalerl_compare(config, recipes, seeds, args.compare_id, args.out_dir)
    print(json.dumps({k: summary[k] for k in ("table", "markdown", "plot")}, indent=2))
    print(Path(summary["markdown"]).read_text(encoding="utf-8"))
    return summary


if __name__ == "__main__":
    main()
