"""scalerl_compare: two recipes x one seed, two steps each, under a real Prefect server, leave one
run per recipe (with the recipe's config), the Table-1-style JSON/markdown and the plot."""

import json

import pytest

from scalerl.config import load_config

pytestmark = pytest.mark.slow


def test_recipe_configs_change_only_their_choice():
    from tasks.compare import recipe_config

    base = load_config(preset="tiny-cpu")
    grpo = recipe_config(base, "grpo", seed=3, run_id="x-grpo-s3")
    assert grpo.algorithm.loss.type == "grpo" and grpo.algorithm.aggregation == "sample"
    assert grpo.algorithm.advantage_normalization == "group"
    assert (grpo.generation.seed, grpo.trainer.seed, grpo.storage.run_id) == (3, 3, "x-grpo-s3")
    sync = recipe_config(base, "sync", seed=0, run_id="x")
    assert sync.pipeline.max_off_policy_steps == 0 and sync.algorithm == base.algorithm
    assert recipe_config(base, "no-fp32-head", seed=0, run_id="x").algorithm.fp32_lm_head is False
    dapo = recipe_config(base, "dapo", seed=0, run_id="x")
    assert dapo.algorithm.loss.type == "dapo" and dapo.algorithm.aggregation == "token"
    for cfg in (grpo, sync, dapo):  # equal compute and the same task
        assert cfg.schedule == base.schedule and cfg.data == base.data
        assert cfg.completions_per_batch == base.completions_per_batch
    with pytest.raises(ValueError, match="Fix: choose from"):
        recipe_config(base, "ppo", seed=0, run_id="x")


def test_compare_two_recipes_two_steps(tmp_path, prefect_harness):
    from flows.compare import main
    from scalerl.plots import PIXELS
    from storage import open_store

    out = tmp_path / "out"
    summary = main([
        "--preset", "tiny-cpu",
        "--set", f"storage.url={tmp_path / 'runs'}",
        "--set", "schedule.max_steps=2",
        "--set", "evaluation.every_steps=1",
        "--set", "data.num_eval_prompts=8",
        "--set", "evaluation.samples_per_prompt=2",
        "--recipes", "scalerl,sync",
        "--seeds", "0",
        "--id", "cmp",
        "--out", str(out),
    ])  # fmt: skip
    store = open_store(str(tmp_path / "runs"))
    assert store.run("cmp-sync-s0").read_config()["pipeline"]["max_off_policy_steps"] == 0
    k = load_config(preset="tiny-cpu").pipeline.max_off_policy_steps
    assert (
        k > 0 and store.run("cmp-scalerl-s0").read_config()["pipeline"]["max_off_policy_steps"] == k
    )
    saved = json.loads((out / "compare.json").read_text())
    assert [r["recipe"] for r in saved["table"]] == ["scalerl", "sync"]
    for row in saved["table"]:
        run = summary["runs"][f"cmp-{row['recipe']}-s0"]
        per_step = load_config(preset="tiny-cpu").completions_per_batch  # prompts x samples
        assert run["compute"] == [0.0, per_step, 2.0 * per_step]
        # with one seed the spread is 0 and the mean is that run's value
        assert row["final_pass_rate"] == {"mean": run["pass_rate"][-1], "std": 0.0, "n": 1}
        assert row["A"]["n"] == 0  # 2 points after version 0: too few for a sigmoid fit
    md = (out / "compare.md").read_text()
    assert md.splitlines()[0].startswith("| recipe | seeds | A | B | C_mid")
    assert "| scalerl | 1 |" in md and "| sync | 1 |" in md
    from PIL import Image

    assert Image.open(out / "compare.png").size == PIXELS
