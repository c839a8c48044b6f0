"""Soak: 4 generators and 1 trainer for a few hundred shards; does anything grow that should not?

    .venv/bin/python bench/soak.py --shards 300 --out bench/results/soak.json
    .venv/bin/python bench/soak.py --shards 40        # a quick look

The run (tiny-cpu preset, transformers engine, small batches) goes in a child process, the way
`scalerl run` does; this process samples every `--interval` seconds, for the child and each of
its descendants (the reward workers), the resident set size, open file descriptors and threads
(psutil, else /proc), plus the disk held by the run's local weight copies under the temporary
directory. "start" is
the first sample after `--warmup-shards` shards went through the flow (models loaded, Prefect's
pools and caches filled, the allocator's arenas grown); "end" is the last sample while the
trainer still ran. When `--shards` shards are through, this process sets the run's status to
`stopping`: the trainer stops, the flow winds down and marks the run finished, as on any stop.

Uses the Prefect server named by PREFECT_API_URL, else starts a temporary one (not measured).
Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import emit, machine

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import sys
from scalerl.config import load_config
from flows.run import scalerl_run
if __name__ == "__main__":
    cfg = load_config(preset="tiny-cpu", overrides=sys.argv[1:])
    scalerl_run(cfg)
"""


def overrides(root: str, run_id: str, generators: int, prompts: int, samples: int) -> list[str]:
    return [
        f"storage.url={root}",
        f"storage.run_id={run_id}",
        f"generation.num_generators={generators}",
        "generation.engine=transformers",
        f"generation.prompts_per_batch={prompts}",
        f"generation.samples_per_prompt={samples}",
        "pipeline.max_off_policy_steps=8",  # the paper's k: little of the data goes stale
        "schedule.max_steps=100000",  # the soak decides when to stop (--shards)
        "trainer.checkpoint_every=50",
        "evaluation.every_steps=100000",
        "data.num_eval_prompts=8",
        "evaluation.samples_per_prompt=4",
    ]


def _ppid(pid: int) -> int | None:
    """The parent's pid from Linux's /proc (None if the process is gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return None


def _role(pid: int, flow_pid: int, cmdline: str) -> str:
    """flow, reward-worker, fork-server, resource-tracker, generator, trainer, evaluator
    (runtime/isolated.py names its children scalerl-gen<i>, scalerl-trainer, scalerl-eval-v<n>),
    or other."""
    if pid == flow_pid:
        return "flow"
    if "scalerl.rewards" in cmdline:
        # the flow's scoring pool; an evaluation process scores with a pool of its own, whose
        # workers go when the evaluation is done (a v0 evaluation can outlast the warm-up)
        return "reward-worker" if _ppid(pid) == flow_pid else "evaluator"
    with contextlib.suppress(OSError):
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        if name == "scalerl-trainer":
            return "trainer"
        if name.startswith("scalerl-gen"):
            return "generator"
        if name.startswith("scalerl-eval"):
            return "evaluator"  # one per evaluation, gone when it is done
    if "multiprocessing.resource_tracker" in cmdline:
        return "resource-tracker"  # started with the fork server
    return "fork-server" if "multiprocessing.forkserver" in cmdline else "other"


def _proc_stats(pid: int) -> tuple[str, float, int, int]:
    """(command line, RSS MiB, open fds, threads) of one process: psutil when it is installed
    (it comes with accelerate), else Linux's /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return (
                " ".join(proc.cmdline()),
                proc.memory_info().rss / 2**20,
                proc.num_fds(),
                proc.num_threads(),
            )
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return (
        cmdline,
        int(status["VmRSS"].split()[0]) / 1024,
        len(os.listdir(f"/proc/{pid}/fd")),
        int(status["Threads"]),
    )


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (ppid := _ppid(int(entry))) is not None:
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def snapshot(flow_pid: int) -> dict:
    """RSS (MiB), open fds and threads of the flow process and each of its descendants."""
    procs = {}
    for pid in [flow_pid, *_descendants(flow_pid)]:
        try:
            cmdline, rss, fds, threads = _proc_stats(pid)
        except Exception as e:  # it ended while we looked (OSError, psutil.NoSuchProcess)
            if pid == flow_pid:
                raise ProcessLookupError(flow_pid) from e
            continue
        procs[str(pid)] = {
            "role": _role(pid, flow_pid, cmdline),
            "rss_mib": round(rss, 1),
            "fds": fds,
            "threads": threads,
        }
    return procs


def tmp_weights_mib(run_id: str) -> float:
    """Disk held by the run's local weight copies (runtime/common.py WeightCache directories)."""
    total = 0
    for d in glob.glob(os.path.join(tempfile.gettempdir(), f"scalerl-{run_id}-w-*")):
        for dirpath, _, files in os.walk(d):
            for f in files:
                with contextlib.suppress(OSError):  # removed while we looked
                    total += os.path.getsize(os.path.join(dirpath, f))
    return round(total / 2**20, 1)


class Sampler(threading.Thread):
    """Samples the flow process tree and the run's progress every `interval` seconds."""

    def __init__(self, flow_pid: int, root: str, run_id: str, interval: float) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.flow_pid, self.root, self.run_id, self.interval = flow_pid, root, run_id, interval
        self.samples: list[dict] = []
        self.done = threading.Event()

    def progress(self) -> tuple[int, str]:
        """(filtered shards, run state); (0, "") until the flow has created the run."""
        from storage import open_store

        try:
            run = open_store(self.root).run(self.run_id)
            filtered = run.count_shards("filtered")
            state = (run.read_status() or {}).get("state", "")
        except Exception:  # the run directory may not exist yet
            return 0, ""
        return filtered, state

    def run(self) -> None:  # noqa: D102 - threading.Thread.run
        t0 = time.monotonic()
        while not self.done.is_set():
            filtered, state = self.progress()
            try:
                procs = snapshot(self.flow_pid)
            except Exception:  # the flow process is gone
                break
            self.samples.append(
                {
                    "t": round(time.monotonic() - t0, 1),
                    "shards": filtered,
                    "state": state,
                    "tmp_weights_mib": tmp_weights_mib(self.run_id),
                    "procs": procs,
                }
            )
            self.done.wait(self.interval)


def _start_prefect_server(home: str) -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PREFECT_HOME": home,
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return server, env
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise RuntimeError("the temporary Prefect server did not start within 120 s")


def summarize(samples: list[dict], warmup_shards: int) -> dict:
    """start/end samples and per-role totals (see the module docstring for the definitions)."""
    running = [s for s in samples if s["state"] == "running"]
    warm = [s for s in running if s["shards"] >= warmup_shards]
    if len(warm) < 2:
        raise RuntimeError(
            f"only {len(warm)} sample(s) after warm-up ({warmup_shards} shards). Fix: raise "
            "--shards or lower --warmup-shards / --interval."
        )
    start, end = warm[0], warm[-1]

    def totals(sample: dict) -> dict:
        out: dict[str, dict] = {}
        for p in sample["procs"].values():
            t = out.setdefault(p["role"], {"processes": 0, "rss_mib": 0.0, "fds": 0, "threads": 0})
            t["processes"] += 1
            t["rss_mib"] = round(t["rss_mib"] + p["rss_mib"], 1)
            t["fds"] += p["fds"]
            t["threads"] += p["threads"]
        return out

    def flow(sample: dict) -> dict:
        return next(p for p in sample["procs"].values() if p["role"] == "flow")

    return {
        "start": {
            "t_s": start["t"],
            "shards": start["shards"],
            "tmp_weights_mib": start["tmp_weights_mib"],
            "processes": start["procs"],
            "by_role": totals(start),
        },
        "end": {
            "t_s": end["t"],
            "shards": end["shards"],
            "tmp_weights_mib": end["tmp_weights_mib"],
            "processes": end["procs"],
            "by_role": totals(end),
        },
        "flow_rss_mib_max_after_warmup": max(flow(s)["rss_mib"] for s in warm),
        # (seconds, shards, flow RSS MiB, flow fds, flow threads), at most ~30 points
        "flow_timeline": [
            [s["t"], s["shards"], *(flow(s)[k] for k in ("rss_mib", "fds", "threads"))]
            for s in warm[:: max(1, len(warm) // 30)]
        ],
        "samples_after_warmup": len(warm),
    }


def soak(
    *,
    shards: int,
    generators: int = 4,
    prompts: int = 2,
    samples: int = 4,
    warmup_shards: int = 20,
    interval: float = 1.0,
    env: dict | None = None,
    storage: str | None = None,
    timeout_s: float = 3600,
) -> dict:
    """Run the soak and return its report (without machine info)."""
    from storage import open_store

    t0 = time.perf_counter()
    server = None
    if env is None:
        env = dict(os.environ)
        if "PREFECT_API_URL" not in env:
            server, env = _start_prefect_server(tempfile.mkdtemp(prefix="scalerl-bench-prefect-"))
    root = storage or tempfile.mkdtemp(prefix="scalerl-bench-soak-")
    run_id = f"soak-{secrets.token_hex(3)}"  # its own /tmp weight folders, even in a shared root
    args = overrides(root, run_id, generators, prompts, samples)
    Path(root).mkdir(parents=True, exist_ok=True)
    child = None
    log = Path(root) / "soak-flow.log"
    try:
        with open(log, "w") as out:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, *args],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        sampler = Sampler(child.pid, root, run_id, interval)
        sampler.start()
        stopped_at = None
        deadline = time.monotonic() + timeout_s
        while child.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(child.pid, signal.SIGKILL)
                raise RuntimeError(f"the soak run did not end within {timeout_s:.0f}s")
            if stopped_at is None and sampler.progress()[0] >= shards:
                stopped_at = time.perf_counter() - t0
                open_store(root).run(run_id).write_status(
                    {"state": "stopping", "reason": f"soak: {shards} shards"}
                )
            time.sleep(0.5)
        sampler.done.set()
        sampler.join()
        if child.returncode != 0:
            raise RuntimeError(
                f"the soak run exited with {child.returncode}:\n{log.read_text()[-3000:]}"
            )
        wall = time.perf_counter() - t0
        run = open_store(root).run(run_id)
        status = run.read_status() or {}
        report = {
            "bench": "soak",
            "run_id": run_id,
            "storage": root,
            "generators": generators,
            "prompts_per_batch": prompts,
            "samples_per_prompt": samples,
            "overrides": args[2:],
            "warmup_shards": warmup_shards,
            "sample_interval_s": interval,
            "shards_target": shards,
            "shards_raw": run.count_shards("raw"),
            "shards_processed": run.count_shards("filtered"),
            "trainer_steps": run.latest_weights_version(),
            "final_state": status.get("state"),
            "wall_s": round(wall, 1),
            "stop_requested_at_s": None if stopped_at is None else round(stopped_at, 1),
            **summarize(sampler.samples, warmup_shards),
        }
        return report
    finally:
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=300, help="Stop after this many shards.")
    parser.add_argument("--generators", type=int, default=4)
    parser.add_argument("--prompts-per-batch", type=int, default=2)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--warmup-shards", type=int, default=20)
    parser.add_argument("--interval", type=float, default=1.0, help="Seconds between samples.")
    parser.add_argument("--storage", help="Run store root (default: a fresh temporary folder).")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the run and server too
    report = soak(
        shards=args.shards,
        generators=args.generators,
        prompts=args.prompts_per_batch,
        samples=args.samples_per_prompt,
        warmup_shards=args.warmup_shards,
        interval=args.interval,
        storage=args.storage,
    )
    report["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    report["machine"] = machine()
    return emit(report, args.out)


if __name__ == "__main__":
    main()
