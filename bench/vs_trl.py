"""This pipeline vs TRL's GRPOTrainer (loss_type "cispo") on the same model, task and batch shape.

    .venv/bin/python bench/vs_trl.py --out bench/results/vs_trl.json
    .venv/bin/python bench/vs_trl.py --steps 3                # a quick smoke run
    .venv/bin/python bench/vs_trl.py --steps 200 --repeats 3  # ours and TRL alternate 3 times

Both sides start from the same warm-started tiny model (`builtin:tiny-warm`, scalerl/warmstart.py)
on arithmetic from its own distribution (1-2 digit a+b, a-b: the tiny-cpu preset's
synthetic:arithmetic-easy, written to a JSONL file here so both sides read the same rows and
the held-out set can be larger), with the tiny-cpu preset's shape: P prompts x G samples per
optimizer step, the same max completion length, learning rate, warmup, temperature and number
of steps, so both see the same number of samples. TRL runs on-policy (one optimizer step per generation
batch, beta = 0, no KL), CISPO with eps_max as TRL's epsilon_high, batch-scaled rewards as in
ScaleRL; ours is the full tiny-cpu pipeline (flows/run.py: PipelineRL-k, curriculum, filtering,
store-backed rollouts; evaluations only at version 0 and at the end). One after the other, in
this process, on the CPU.

Reported per side: wall seconds, trained samples per second, generated samples per second
(ours also over its training window: from the flow's start to the trainer's last step, which
covers what TRL's train() does plus our prepare, process starts and model loads, but not the
final evaluation, fit, plots and report that follow it; TRL does none of those), and
the held-out pass rate of the final policy measured by the same sampler
(scalerl.warmstart.pass_rate: the run's held-out prompts x `--eval-samples` samples at
temperature 1). Ours samples more completions than it trains on (zero-variance groups are
filtered out, and shards in flight at the stop are never read), so TRL runs twice: "trl" at
the same number of optimizer steps (equal trained samples) and "trl_equal_generated" at the
same number of generated completions as ours (equal generation compute). Ours also reports its
steady-state rate from the trainer's own per-step timestamps (without prepare and the two
evaluations). Ours' wall includes prepare, both evaluations, the fit, plots and the report.
Untimed on both sides: imports and the model load for TRL; the temporary Prefect server and
the fork server's imports (runtime/isolated.py) for ours.
Without TRL installed the TRL side is skipped with a message (JSON "trl": {"skipped": ...}).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import emit, machine

IN_RUN_EVAL_SAMPLES = (
    512  # per in-run evaluation of ours (v0 and the end), whatever the held-out size
)


def _config(steps: int, work: Path, overrides: list[str] = (), eval_prompts: int = 256):
    """tiny-cpu on arithmetic from the warm start's distribution (1-2 digit a+b, a-b), as rows.
    `eval_prompts` held-out prompts: the final pass rates are measured on all of them x
    --eval-samples; ours' own in-run evaluations (at version 0, inside its timed window, and at
    the end) sample IN_RUN_EVAL_SAMPLES in all, so a larger held-out set costs ours no more."""
    from scalerl.config import load_config
    from scalerl.warmstart import task_rows

    data = work / "arithmetic.jsonl"
    rows = task_rows(2_048 + eval_prompts, seed=0)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={work / 'runs'}",
            f"data.source={data}",
            "data.task=arithmetic",
            f"data.num_eval_prompts={eval_prompts}",
            f"evaluation.samples_per_prompt={max(1, IN_RUN_EVAL_SAMPLES // eval_prompts)}",
            f"schedule.max_steps={steps}",
            f"evaluation.every_steps={steps}",
            *overrides,
        ],
    )


def _noop() -> None:
    return None


def run_ours(config) -> dict:
    from prefect import flow

    from flows.run import scalerl_run
    from runtime.common import WeightCache, open_run
    from runtime.isolated import wait_for_server

    flow(name="vs-trl-warmup")(_noop)()  # starts Prefect's temporary server, untimed
    # The fork server imports torch and transformers for the generator and trainer processes;
    # TRL's side also has its imports done and its model loaded before its clock starts.
    wait_for_server()
    t0, start = time.perf_counter(), time.time()
    result = scalerl_run(config)
    wall = time.perf_counter() - t0
    run = open_run(config, result["run_id"])
    times = sorted(float(t) for t in run.read_metrics("trainer").column("time").to_pylist())
    # from the flow's start to the trainer's last step: what TRL's train() covers, plus our
    # prepare, process starts and model loads (the final evaluation, fit, plots and report are
    # after it; the version-0 evaluation runs beside the first steps)
    train_wall = times[-1] - start if times else wall
    steps = result.get("step", 0)
    samples = steps * config.completions_per_batch
    # every completion sampled, including zero-variance groups the filter dropped and shards
    # still in flight when the trainer stopped: the generation compute the run spent
    generated = sum(info.rows for info in run.list_shards("raw"))
    steady = (
        (len(times) - 1) * config.completions_per_batch / (times[-1] - times[0])
        if len(times) > 1 and times[-1] > times[0]
        else None
    )
    final = WeightCache(run).path(run.latest_weights_version() or 0)
    return {
        "steps": steps,
        "samples": samples,
        "generated_samples": generated,
        "wall_s": round(wall, 1),
        "samples_per_s": samples / wall,
        "generated_samples_per_s": generated / wall,
        "train_wall_s": round(train_wall, 1),
        "samples_per_s_train_window": samples / train_wall,
        "generated_samples_per_s_train_window": generated / train_wall,
        "samples_per_s_steady": steady,
        "final_model": str(final),
    }


def run_trl(config, base: Path, train_rows: list[dict], out_dir: Path, steps: int) -> dict:
    try:
        import trl
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        return {"skipped": f"TRL is not installed ({exc}). Fix: pip install trl"}
    from scalerl.models import load_policy
    from scalerl.rewards.synthetic import ArithmeticScorer

    scorer = ArithmeticScorer()

    def accuracy(prompts, completions, answer, **_):
        return [
            scorer.score({"answer": a}, c).value for c, a in zip(completions, answer, strict=True)
        ]

    gen, opt = config.generation, config.optimizer
    batch = gen.prompts_per_batch * gen.samples_per_prompt
    args = GRPOConfig(
        output_dir=str(out_dir),
        loss_type="cispo",
        epsilon_high=config.algorithm.loss.eps_max,
        beta=0.0,
        scale_rewards="batch",
        num_generations=gen.samples_per_prompt,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        learning_rate=opt.lr,
        warmup_steps=opt.warmup_steps,
        lr_scheduler_type="constant_with_warmup",
        adam_epsilon=opt.eps,
        weight_decay=opt.weight_decay,
        max_grad_norm=opt.max_grad_norm,
        max_steps=steps,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=config.trainer.seed,
        disable_tqdm=True,
    )
    model, tokenizer = load_policy(str(base), dtype="float32")
    need = steps * gen.prompts_per_batch
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in train_rows]
    rows = (rows * (need // len(rows) + 1))[:need]  # epochs over the prompts if need be
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=accuracy,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    final = out_dir / "final"
    trainer.model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    return {
        "version": trl.__version__,
        "steps": int(trainer.state.global_step),
        "samples": int(trainer.state.global_step) * batch,
        "generated_samples": int(trainer.state.global_step) * batch,  # TRL trains on all
        "wall_s": round(wall, 1),
        "samples_per_s": int(trainer.state.global_step) * batch / wall,
        "generated_samples_per_s": int(trainer.state.global_step) * batch / wall,
        "final_model": str(final),
    }


def _summary(runs: list[dict]) -> dict:
    """Medians of every number over the runs (mean for the pass rate), and the runs."""
    if len(runs) == 1:
        return {**runs[0], "runs": runs}
    out: dict = {}
    for key, value in runs[0].items():
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if isinstance(value, (int, float)) and len(values) == len(runs):
            out[key] = statistics.median(values)
    out["final_pass_rate"] = statistics.mean(r["final_pass_rate"] for r in runs)
    out.update({k: v for k, v in runs[0].items() if k not in out})  # e.g. the TRL version
    out["runs"] = runs
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps on each side.")
    parser.add_argument(
        "--eval-prompts",
        type=int,
        default=256,
        help="Held-out prompts the final pass rates are measured on (x --eval-samples each): "
        "at 256 x 8 the standard error of a pass rate near 0.65 is about 0.01.",
    )
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Ours and TRL (same steps) alternate this many times; medians and every pair.",
    )
    parser.add_argument("--out", help="Also write the JSON here.")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Config override for both sides (e.g. pipeline.max_off_policy_steps=8).",
    )
    args = parser.parse_args(argv)

    from runtime.common import materialize_base_model
    from scalerl.data import load_prompts
    from scalerl.warmstart import pass_rate

    work = Path(tempfile.mkdtemp(prefix="scalerl-vs-trl-"))
    config = _config(args.steps, work, args.set, args.eval_prompts)
    base = materialize_base_model(config, work / "base")
    prompts = load_prompts(config.data)
    held_out = prompts.eval

    def score(path) -> float:
        return pass_rate(path, held_out, samples=args.eval_samples, temperature=1.0, seed=1)

    report: dict = {
        "bench": "vs_trl",
        "command": " ".join(
            ["python bench/vs_trl.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "task": config.data.source,
        "model": config.model.name_or_path,
        "batch": {
            "prompts": config.generation.prompts_per_batch,
            "samples_per_prompt": config.generation.samples_per_prompt,
            "max_new_tokens": config.generation.max_new_tokens,
        },
        "steps": args.steps,
        "held_out": {"prompts": len(held_out), "samples": args.eval_samples, "temperature": 1.0},
        "start_pass_rate": score(base),
    }
    # Ours and TRL (same optimizer steps) alternate `--repeats` times: on a shared machine the
    # rate drifts by 10-15% between minutes, so each ours run is compared with the TRL run right
    # after it, and the report gives every pair and the medians.
    per_step = config.completions_per_batch
    ours_runs, trl_runs = [], []
    for i in range(args.repeats):
        ours = run_ours(config)
        ours["final_pass_rate"] = score(ours.pop("final_model"))
        ours_runs.append(ours)
        side = run_trl(config, base, prompts.train, work / f"trl-{i}", args.steps)
        if "final_model" not in side:
            print(f"TRL side skipped: {side['skipped']}")
            trl_runs = None
            report["trl"] = side
            break
        side["final_pass_rate"] = score(side.pop("final_model"))
        trl_runs.append(side)
    report["ours"] = _summary(ours_runs)
    if trl_runs:
        report["trl"] = _summary(trl_runs)
        # TRL at the same number of generated completions as ours (ours also samples the
        # zero-variance groups it filters out, and shards in flight at the stop): once
        steps = -(-int(report["ours"]["generated_samples"]) // per_step)
        side = run_trl(config, base, prompts.train, work / "trl_equal_generated", steps)
        side["final_pass_rate"] = score(side.pop("final_model"))
        report["trl_equal_generated"] = side
        pairs = list(zip(ours_runs, trl_runs, strict=True))
        report["pairs"] = [
            {
                "samples_per_s_ratio": o["samples_per_s"] / t["samples_per_s"],
                "samples_per_s_train_window_ratio": o["samples_per_s_train_window"]
                / t["samples_per_s"],
                "samples_per_s_steady_ratio": (o["samples_per_s_steady"] or 0) / t["samples_per_s"],
                "pass_rate_difference": o["final_pass_rate"] - t["final_pass_rate"],
            }
            for o, t in pairs
        ]
        for key in (
            "samples_per_s_ratio",
            "samples_per_s_train_window_ratio",
            "samples_per_s_steady_ratio",
        ):
            report[f"{key}_ours_over_trl"] = statistics.median(p[key] for p in report["pairs"])
        report["pass_rate_difference_ours_minus_trl"] = statistics.mean(
            p["pass_rate_difference"] for p in report["pairs"]
        )
        report["generated_samples_per_s_train_window_ratio_ours_over_trl"] = (
            report["ours"]["generated_samples_per_s_train_window"]
            / report["trl_equal_generated"]["generated_samples_per_s"]
        )
    report["machine"] = machine()
    return emit(report, args.out)


if __name__ == "__main__":
    main()
