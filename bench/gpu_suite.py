"""The GPU suite: one command, about 10 minutes on one H100, no network. `make gpu-bench`.

    python bench/gpu_suite.py [--out bench/results/gpu_suite.json] [--budget-s 600]

For a full GPU node with vLLM and Prefect installed; bench/gpu_smoke.py is the check for a
machine without them.

Model: Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4,864,
vocabulary 151,936) with random weights and the built-in tokenizer (scalerl/models.py
build_tiny_model), so nothing is downloaded. Parts, each in its own process with a time limit,
each reported even when another fails:

1. engine: VLLMEngine (step loop, per-token logprobs and versions) vs bare vllm.LLM.generate with
   logprobs at the same settings: tokens/s and ratio (bench/engine_throughput.py, bf16, FP32 head
   on both sides).
2. trainer: our train_step vs a bare forward/backward/AdamW loop on the same micro-batches:
   tokens/s and ratio (bench/trainer_step.py), and MFU = 6 x parameters x (prompt + completion
   tokens)/s / the GPU's dense bf16 peak.
3. weight update: the generator's stall per in-flight weight update (VLLMEngine.load_weights
   of a published directory, mean of 3).
4. pipeline: a whole `scalerl run` on this GPU (vLLM generator, trainer, evaluation colocated:
   placement.colocate) at k = 8 and at k = 0: trained samples/s between the first and last
   trainer step, and every process's peak GPU memory (nvidia-smi, polled).

Each part runs in its own session with a time limit (CAPS, scaled down to fit the budget when
they add up to more): past it, its whole process group is killed, so an evaluation child or an
engine process cannot keep GPU memory into the next part. A part is reported as ok, failed,
timeout, or skipped (too little of the budget left). bench/gpu_smoke.py's run_limited and
run_parts do this for both scripts.

Prints one JSON object (and writes it to --out). What has run on which GPU, with dates, is in
the README's GPU section.
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
import threading
import time
from pathlib import Path

from gpu_smoke import run_limited, run_parts

REPO = Path(__file__).resolve().parents[1]
# seconds per part; they add up to the default budget less the model build (~15 s). The engine
# part starts vLLM twice (one engine per process), each pipeline a Prefect server and two.
CAPS = {
    "engine": 150.0,
    "trainer": 75.0,
    "weight_update": 60.0,
    "pipeline_k8": 150.0,
    "pipeline_k0": 150.0,
}
SHAPE = dict(
    hidden_size=896,
    layers=24,
    heads=14,
    kv_heads=2,
    intermediate_size=4_864,
    vocab_size=151_936,
    max_position_embeddings=4_096,
)
# dense bf16 peak FLOP/s by GPU name (vendor data sheets, SXM parts)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def _json_from(text: str) -> dict:
    """The last JSON object a bench script printed."""
    start = text.rfind("\n{")
    return json.loads(text[start + 1 :] if start >= 0 else text)


def _script(args: list[str], timeout: float) -> dict:
    return _json_from(run_limited([sys.executable, *args], timeout, cwd=REPO))


def gpu_name() -> str:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"


def engine_part(timeout: float) -> dict:
    return _script(
        [
            "bench/engine_throughput.py",
            "--engines=vllm",
            "--model-shape=qwen2-0.5b",
            "--dtype=bfloat16",
            "--device=cuda",
            "--prompts=32",
            "--samples=8",
            "--tokens=256",
            "--repeats=2",
            "--gpu-memory-utilization=0.5",
        ],
        timeout,
    )


def trainer_part(timeout: float, params: int, peak: float | None) -> dict:
    prompt, completion = 64, 448
    result = _script(
        [
            "bench/trainer_step.py",
            "--model-shape=qwen2-0.5b",
            "--device=cuda",
            "--dtype=bfloat16",
            f"--prompt-len={prompt}",
            f"--completion-len={completion}",
            "--prompts=8",
            "--samples=8",
            "--micro-batch-tokens=16384",
            "--steps=5",
        ],
        timeout,
    )
    tokens_per_s = result["ours_tokens_per_s"] * (prompt + completion) / completion
    if peak:
        result["mfu"] = round(6 * params * tokens_per_s / peak, 4)
    result["mfu_basis"] = "6 x parameters x (prompt + completion) tokens/s / dense bf16 peak"
    return result


WEIGHT_UPDATE = r"""
import json, sys, time
from scalerl.engines.vllm_engine import VLLMEngine
engine = VLLMEngine(sys.argv[1], dtype="bfloat16", gpu_memory_utilization=0.4, max_batch_size=64)
times = []
for v in (1, 2, 3):
    t0 = time.perf_counter()
    engine.load_weights(v, sys.argv[1])
    times.append(time.perf_counter() - t0)
engine.close()
print(json.dumps({"stall_s_per_update": sum(times) / len(times), "each_s": times}))
"""


def weight_update_part(model: Path, timeout: float) -> dict:
    return _script(["-c", WEIGHT_UPDATE, str(model)], timeout)


class GpuMemory:
    """Peak GPU memory per process (name from /proc), polled from nvidia-smi."""

    def __init__(self) -> None:
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            out = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-compute-apps=pid,used_memory",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
            )
            for line in out.stdout.splitlines():
                pid, _, mib = line.partition(",")
                try:
                    name = Path(f"/proc/{pid.strip()}/comm").read_text().strip()
                except OSError:
                    name = f"pid {pid.strip()}"
                self.peak[name] = max(self.peak.get(name, 0.0), float(mib))


def pipeline_part(model: Path, k: int, root: Path, timeout: float) -> dict:
    run_id = f"gpu-k{k}"
    overrides = [
        f"model.name_or_path={model}",
        "model.dtype=bfloat16",
        "data.source=synthetic:arithmetic",
        "data.num_eval_prompts=32",
        "generation.engine=vllm",
        "generation.prompts_per_batch=16",
        "generation.samples_per_prompt=8",
        "generation.max_new_tokens=256",
        "generation.max_batch_size=256",
        "generation.gpu_memory_utilization=0.3",
        "generation.num_generators=1",
        "length_control.enabled=false",
        # a random model solves nothing: without the filter every batch still makes a step
        "algorithm.zero_variance_filter=false",
        f"pipeline.max_off_policy_steps={k}",
        "pipeline.max_queued_batches=null",
        "evaluation.every_steps=1000",
        "evaluation.gpu_memory_utilization=0.1",
        "trainer.checkpoint_every=1000",
        "trainer.micro_batch_tokens=16384",
        "schedule.max_steps=12",
        "placement.accelerator=cuda",
        "placement.devices_per_node=1",
        "placement.trainer_ranks=1",
        "placement.colocate=true",
    ]
    cmd = [str(Path(sys.executable).parent / "scalerl"), "run", "--preset", "tiny-cpu"]
    for o in overrides:
        cmd += ["--set", o]
    cmd += ["--storage", str(root), "--run-id", run_id]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with GpuMemory() as mem:
        run_limited(cmd, timeout, env=env)  # the Prefect server and engines die with it
    sys.path.insert(0, str(REPO))
    from storage import open_store

    rows = open_store(str(root)).run(run_id).read_metrics("trainer").to_pylist()
    times = [r["time"] for r in rows]
    samples = sum(r["samples_kept"] for r in rows[1:])  # those trained after the first step
    staleness = re.findall(r"staleness/(\d+)", " ".join(rows[-1].keys()))
    return {
        "k": k,
        "steps": len(rows),
        "trained_samples_per_s": round(samples / max(1e-9, times[-1] - times[0]), 2),
        "mean_wait_s": round(sum(r["wait_s"] for r in rows) / len(rows), 3),
        "staleness_buckets": len(staleness),
        "peak_gpu_memory_mib_by_process": mem.peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gpu_suite.json")
    ap.add_argument("--budget-s", type=float, default=600.0)
    args = ap.parse_args()
    t0 = time.monotonic()
    name = gpu_name()
    peak = next((v for key, v in PEAK_BF16.items() if key in name), None)
    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": "Qwen2.5-0.5B shape, random weights, built-in tokenizer",
    }
    sys.path.insert(0, str(REPO))
    from scalerl.models import build_tiny_model
    from scalerl.placement import model_shape

    with tempfile.TemporaryDirectory(prefix="scalerl-gpu-suite-") as tmp:
        model = build_tiny_model(Path(tmp) / "model", seed=0, **SHAPE)
        params = model_shape(str(model)).params
        result["parameters"] = params
        runs = Path(tmp) / "runs"
        parts = {
            "engine": engine_part,
            "trainer": lambda limit: trainer_part(limit, params, peak),
            "weight_update": lambda limit: weight_update_part(model, limit),
            "pipeline_k8": lambda limit: pipeline_part(model, 8, runs, limit),
            "pipeline_k0": lambda limit: pipeline_part(model, 0, runs, limit),
        }
        budget = args.budget_s - (time.monotonic() - t0)  # what the model build left
        result |= run_parts([(k, CAPS[k], fn) for k, fn in parts.items()], budget, min_part_s=30)
    k8 = result.get("pipeline_k8", {}).get("trained_samples_per_s")
    k0 = result.get("pipeline_k0", {}).get("trained_samples_per_s")
    if k8 and k0:
        result["pipeline_k8_over_k0"] = round(k8 / k0, 3)
    result["seconds"] = round(time.monotonic() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
