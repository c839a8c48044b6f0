"""A slow object store: a short tiny-cpu run on S3 (moto_server) behind a TCP proxy on loopback
that delays every HTTP request by D ms before forwarding it, at D = 0, 20 and 100 ms.

    .venv/bin/python bench/store_latency.py [--delays 0,20,100] [--steps 12] [--repeat N] [--out FILE]

The proxy (`LatencyProxy`, asyncio in a thread of its own) parses the request stream of each
connection (request line, headers, a Content-Length or chunked body), sleeps D ms, forwards the
request, and counts it by kind (list, get, head, put, delete, post) and by the area of the run it
touches (shards/raw, markers, lease, weights, ...). Responses flow back unparsed. Every request of
every process of the run goes through it: the run's storage.endpoint_url points at the proxy.
The bench starts its own moto_server and Prefect server, so neither counts in the run's time.

Reported per delay: store requests per trainer step and per raw shard (by kind and by area),
steps per second (trainer metrics `time`, from the first trained step to the last: start-up is
not in it) and the wall time of the whole run, each with its ratio to 0 ms. The goal: at 20 ms
per request, within 1.3x of 0 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
BUCKET = "scalerl-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def classify(method: str, target: str) -> tuple[str, str]:
    """(kind, area) of one S3 request. kind: list, get, head, put, delete, post; area: the
    part of the run directory it touches (the path after the run id, to two levels for shards
    and markers), e.g. ('list', 'shards/filtered'), ('get', 'markers/trainer-intake')."""
    parsed = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    parts = [urllib.parse.unquote(p) for p in parsed.path.split("/") if p]
    if method == "GET" and ("list-type" in query or "prefix" in query or len(parts) <= 1):
        kind = "list"
        key = query.get("prefix", [""])[0].split("/")
    else:
        kind = {"GET": "get", "HEAD": "head", "PUT": "put", "DELETE": "delete"}.get(
            method, method.lower()
        )
        key = parts[1:]
    return kind, _area(key)


_AREAS_2 = {"shards", "markers", "metrics", "quarantine"}


def _area(key: list[str]) -> str:
    """Bench layout: bucket/PREFIX/runs/RUN/<area...>: the run directory's part of the key."""
    key = [k for k in key if k]
    if "runs" in key:
        key = key[key.index("runs") + 2 :]
    if not key:
        return "run"
    if key[0] in _AREAS_2 and len(key) > 1:
        name = key[1]
        if key[0] == "markers":
            name = name.removesuffix(".json")
        return f"{key[0]}/{name}"
    return key[0]


class LatencyProxy:
    """127.0.0.1:port -> upstream, each HTTP request delayed by `delay_ms` and counted.
    `counts` (Counter of (kind, area)) and `total` are read with `snapshot()`; `reset()` zeroes
    them. Change `delay_ms` at any time."""

    def __init__(self, upstream: tuple[str, int], delay_ms: float = 0.0) -> None:
        self.upstream, self.delay_ms = upstream, float(delay_ms)
        self._lock = threading.Lock()
        self.counts: Counter = Counter()
        self._handlers: set = set()
        self.trace: list | None = None  # [(time, pid, kind, area)] when tracing
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        started.wait(10)

    def snapshot(self) -> Counter:
        with self._lock:
            return Counter(self.counts)

    def reset(self, trace: bool = False) -> None:
        with self._lock:
            self.counts.clear()
            self.trace = [] if trace else None

    def close(self) -> None:
        async def stop() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), self._loop)
        self._thread.join(5)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port, backlog=256)
        )
        started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        this = asyncio.current_task()
        self._handlers.add(this)  # asyncio keeps only weak references to tasks
        try:
            await self._forward(reader, writer)
        finally:
            self._handlers.discard(this)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        pid = None
        if self.trace is not None:  # which process holds the client end of this connection
            port = writer.get_extra_info("peername")[1]
            pid = await asyncio.get_running_loop().run_in_executor(None, _pid_of_port, port)
        back = asyncio.ensure_future(self._pump(up_reader, writer))
        self._handlers.add(back)
        back.add_done_callback(self._handlers.discard)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target = head.split(b" ", 2)[:2]
                headers = {}
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                kind_area = classify(method.decode(), target.decode("latin-1"))
                with self._lock:
                    self.counts[kind_area] += 1
                    if self.trace is not None:
                        self.trace.append((time.time(), pid, *kind_area))
                if self.delay_ms > 0:
                    await asyncio.sleep(self.delay_ms / 1000)
                # the head first: a client that sent `Expect: 100-continue` sends its body
                # only after the server's interim answer
                up_writer.write(head)
                if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                    await self._chunked(reader, up_writer)
                else:
                    await self._body(reader, up_writer, int(headers.get(b"content-length") or 0))
                await up_writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                up_writer.close()
            await asyncio.gather(back, return_exceptions=True)
            with contextlib.suppress(OSError):
                writer.close()

    @staticmethod
    async def _body(reader: asyncio.StreamReader, dst: asyncio.StreamWriter, size: int) -> None:
        while size > 0:
            data = await reader.read(min(size, 1 << 20))
            if not data:
                raise asyncio.IncompleteReadError(b"", size)
            dst.write(data)
            await dst.drain()
            size -= len(data)

    @classmethod
    async def _chunked(cls, reader: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while True:
            line = await reader.readuntil(b"\r\n")
            dst.write(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = await reader.readuntil(b"\r\n")
                    dst.write(trailer)
                    if trailer == b"\r\n":
                        return
            await cls._body(reader, dst, size + 2)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.close()


def _pid_of_port(port: int) -> int | None:
    """The process whose TCP socket has local port `port` on loopback (tracing only)."""
    import psutil

    for conn in psutil.net_connections(kind="tcp4"):
        if conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


@contextlib.contextmanager
def moto_server():
    """A moto_server on loopback with bucket BUCKET; yields its endpoint URL."""
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    endpoint = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.1)
        req = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
        urllib.request.urlopen(req, timeout=10).close()
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def prefect_server(home: Path):
    """A Prefect server of the bench's own; yields the environment that points clients at it."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2),
            ):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start (log: {home / 'server.log'})")
            time.sleep(0.5)
        yield env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        log.close()


RUN_SCRIPT = """
import sys
from scalerl.config import load_config
from flows.run import scalerl_run
if __name__ == "__main__":
    url, endpoint, run_id, steps = sys.argv[1:5]
    cfg = load_config(preset="tiny-cpu", overrides=[
        f"storage.url={url}", f"storage.endpoint_url={endpoint}", f"storage.run_id={run_id}",
        f"schedule.max_steps={steps}", f"trainer.checkpoint_every={steps}",
        "evaluation.every_steps=1000", "data.num_eval_prompts=8"])
    scalerl_run(cfg)
"""


def run_once(
    env: dict,
    moto: str,
    proxy: LatencyProxy,
    delay_ms: float,
    steps: int,
    repo: Path,
    trace_dir: Path | None = None,
) -> dict:
    """One run through the proxy at `delay_ms` with the code of checkout `repo`; its counts,
    rates and times. With `trace_dir`, every request's (time, process role, kind, area) and the
    trainer's step times go to trace_dir/trace-<delay>ms.json."""
    from storage import open_store

    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/runs"
    run_id = f"lat{int(delay_ms)}"
    proxy.delay_ms = delay_ms
    proxy.reset(trace=trace_dir is not None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, url, proxy.url, run_id, str(steps)],
        env={**env, **S3_ENV, "PYTHONPATH": str(repo)},
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    wall = time.monotonic() - start
    counts = proxy.snapshot()
    trace = proxy.trace
    if proc.returncode != 0:
        raise RuntimeError(f"the run at {delay_ms} ms failed:\n{proc.stdout[-3000:]}")
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto}}
    run = open_store(url, storage_options=options).run(run_id)  # direct, not through the proxy
    metrics = run.read_metrics("trainer").to_pylist()
    times = sorted(float(r["time"]) for r in metrics)
    trained = len(times)
    raw = run.count_shards("raw")
    span = times[-1] - times[0] if trained > 1 else float("nan")
    by_kind: Counter = Counter()
    by_area: Counter = Counter()
    for (kind, area), n in counts.items():
        by_kind[kind] += n
        by_area[f"{kind} {area}"] += n
    total = sum(counts.values())
    if trace_dir is not None and trace is not None:
        _write_trace(trace_dir / f"trace-{int(delay_ms)}ms.json", trace, times)
    return {
        "delay_ms": delay_ms,
        "steps": trained,
        "raw_shards": raw,
        "requests": total,
        "requests_per_step": round(total / trained, 1),
        "requests_per_raw_shard": round(total / raw, 1) if raw else None,
        "per_step_by_kind": {k: round(n / trained, 2) for k, n in sorted(by_kind.items())},
        "per_step_by_area": {
            k: round(n / trained, 2) for k, n in by_area.most_common() if n / trained >= 0.5
        },
        "steps_per_s": round((trained - 1) / span, 4) if trained > 1 else None,
        "wall_s": round(wall, 1),
    }


def _write_trace(path: Path, trace: list, step_times: list[float]) -> None:
    """The request trace with each process named by what it writes: trainer (metrics/trainer),
    generator (shards/raw), flow (shards/scored); others by pid."""
    import json

    roles: dict = {}
    role = {"metrics/trainer": "trainer", "shards/raw": "generator", "shards/scored": "flow"}
    for _, pid, kind, area in trace:
        if kind == "put" and area in role and pid not in roles:
            roles[pid] = role[area]
    rows = [[round(t, 4), roles.get(pid, f"pid{pid}"), kind, area] for t, pid, kind, area in trace]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step_times": step_times, "requests": rows}))


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from common import emit, machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", default="0,20,100", help="ms per request, comma-separated")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per delay, interleaved (0, 20, 100, 0, 20, ...); the summary takes each "
        "delay's median steps/s (one run of a few steps on 2 busy cores varies by tens of %%)",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--trace",
        default=None,
        help="folder for a per-request trace of each run (time, process, kind, area)",
    )
    parser.add_argument(
        "--repo",
        default=str(REPO),
        help="checkout whose code the runs use (e.g. an export "
        "of an older commit, for before/after numbers); default this one",
    )
    args = parser.parse_args(argv)
    delays = [float(d) for d in args.delays.split(",")]
    results = []
    with (
        tempfile.TemporaryDirectory() as home,
        moto_server() as moto,
        prefect_server(Path(home)) as env,
    ):
        host, port = moto.removeprefix("http://").split(":")
        proxy = LatencyProxy((host, int(port)))
        try:
            for delay in delays * args.repeat:
                trace = Path(args.trace) if args.trace else None
                results.append(
                    run_once(env, moto, proxy, delay, args.steps, Path(args.repo), trace)
                )
                print(results[-1], file=sys.stderr, flush=True)
        finally:
            proxy.close()
    base = results[0]
    for r in results:
        r["steps_per_s_ratio_to_first"] = (
            round(base["steps_per_s"] / r["steps_per_s"], 3) if r["steps_per_s"] else None
        )
        r["wall_ratio_to_first"] = round(r["wall_s"] / base["wall_s"], 3)
    summary = []
    for delay in delays:
        rates = [r["steps_per_s"] for r in results if r["delay_ms"] == delay and r["steps_per_s"]]
        reqs = [r["requests_per_step"] for r in results if r["delay_ms"] == delay]
        summary.append(
            {
                "delay_ms": delay,
                "runs": len(rates),
                "steps_per_s_each": rates,
                "steps_per_s_median": statistics.median(rates) if rates else None,
                "requests_per_step_median": statistics.median(reqs) if reqs else None,
            }
        )
    first = summary[0]["steps_per_s_median"]
    for row in summary:
        med = row["steps_per_s_median"]
        row["slowdown_vs_first"] = round(first / med, 3) if first and med else None
    report = {
        "machine": machine(),
        "what": "tiny-cpu run on S3 (moto_server) behind a proxy adding delay_ms per request",
        "steps": args.steps,
        "code": "this checkout" if Path(args.repo) == REPO else args.repo,
        "goal": "at 20 ms per request, steps/s within 1.3x of 0 ms",
        "summary": summary,
        "results": results,
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
