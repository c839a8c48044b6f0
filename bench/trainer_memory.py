"""Peak host memory of each trainer rank: 2 gloo ranks vs 1 process, same run, model >= 100M.

    .venv/bin/python bench/trainer_memory.py [--layers 12] [--hidden 768] [--steps 2]

Builds a random Qwen2-architecture model (default 12 layers, hidden 768, 12 heads, MLP 3,072,
vocabulary 32,000 padded onto the tiny tokenizer: ~138M parameters), then runs the same short
tiny-cpu pipeline twice with it: the trainer as one forked process, and as 2 ranks under
torchrun (placement.trainer_ranks=2: FSDP2 over gloo, meta-device build, DCP checkpoints).
Each run checkpoints after every step; the zero-variance filter is off, since a random model
solves nothing and every step would otherwise be skipped. Every rank reports its peak RSS (getrusage) when it
stops; the single process's peak comes from its log line. Also measured: the RSS of a process
that only imported torch and transformers (what every process pays before any tensor).

Prints one JSON object: parameters, the full fp32 training state (weights + gradients + AdamW
moments = 16 bytes per parameter), each peak, and per process the peak above the import
baseline. The claim under test: no rank holds the full fp32 model and optimizer state, i.e.
each rank's peak above the baseline (ranks are fresh interpreters, like the baseline) is below
16 x parameters bytes. The single process is a fork of the flow's fork server (torch and
transformers already imported, runtime/isolated.py), so its own baseline is not this one: its
figure above the baseline is only indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from common import add_model_args, build_bench_model  # noqa: E402

MIB = 1024 * 1024


def _baseline_mib() -> float:
    code = (
        "import resource, torch, transformers; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _run(model: Path, root: Path, ranks: int, steps: int) -> tuple[list[float], float]:
    cmd = [
        str(Path(sys.executable).parent / "scalerl"),
        "run",
        "--preset",
        "tiny-cpu",
        "--storage",
        str(root),
        "--run-id",
        f"mem-{ranks}",
        "--set",
        f"model.name_or_path={model}",
        "--set",
        f"placement.trainer_ranks={ranks}",
        "--set",
        f"schedule.max_steps={steps}",
        "--set",
        "trainer.checkpoint_every=1",
        "--set",
        "generation.prompts_per_batch=4",
        "--set",
        "generation.samples_per_prompt=4",
        "--set",
        "evaluation.every_steps=1000",
        "--set",
        "data.num_eval_prompts=4",
        "--set",
        "data.source=synthetic:arithmetic-easy",
        # a random model solves nothing: without the filter every batch still makes a step
        # (zero advantages), which is all a memory measurement needs
        "--set",
        "algorithm.zero_variance_filter=false",
    ]
    t0 = time.monotonic()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise SystemExit(f"the {ranks}-rank run failed:\n{text[-4000:]}")
    if ranks > 1:
        peaks = [
            float(m) for _, m in sorted(re.findall(r"\[rank (\d+)\] peak RSS (\d+) MiB", text))
        ]
    else:
        peaks = [float(m) for m in re.findall(r"trainer stopped at .*?peak RSS (\d+) MiB", text)]
    if len(peaks) != ranks:
        raise SystemExit(f"expected {ranks} peak RSS lines, found {peaks}:\n{text[-3000:]}")
    return peaks, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()

    from scalerl.placement import model_shape

    with tempfile.TemporaryDirectory(prefix="scalerl-bench-mem-") as tmp:
        model = build_bench_model(Path(tmp) / "model", args)
        params = model_shape(str(model)).params
        state = 16 * params / MIB
        baseline = _baseline_mib()
        single, t1 = _run(model, Path(tmp) / "runs", 1, args.steps)
        sharded, t2 = _run(model, Path(tmp) / "runs", 2, args.steps)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "parameters": params,
        "full_fp32_training_state_mib": round(state),
        "import_baseline_mib": round(baseline),
        "single_process_peak_mib": round(single[0]),
        "single_process_above_baseline_mib": round(single[0] - baseline),
        "two_ranks_peak_mib": [round(x) for x in sharded],
        "two_ranks_above_baseline_mib": [round(x - baseline) for x in sharded],
        "no_rank_holds_full_state": all(x - baseline < state for x in sharded),
        "rank_peak_over_single_peak": [
            round((x - baseline) / (single[0] - baseline), 3) for x in sharded
        ],
        "seconds": {"single": round(t1, 1), "two_ranks": round(t2, 1)},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
