"""A reusable process pool that runs one call per item with a per-item timeout.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot stop one hung call. A
runaway sympy expression (``10^(10^100)``) would hold a worker forever, and the only
way out would be to tear the whole pool down. Here every worker is a process with its
own pipe; the parent waits on all pipes with a deadline per item, and a worker whose
item runs past its deadline (or that dies) is killed and replaced; only that item
fails. Verifiers run on the worker's main thread, so libraries that time out with
``signal.alarm`` would work there too; math.py passes ``timeout=None`` to math-verify
anyway and relies on this pool for the bound.

Workers are fresh interpreters (``python -c <worker_entry>``, about 0.4 s to
start with math-verify imported), started on first use, reused across calls and
threads, and limited in address space (``memory_limit_mb``) so a blow-up raises
MemoryError in the worker instead of exhausting the machine. A replacement starts at
once in the background; an item's deadline only starts once a ready worker has it.

    with ScoringPool(workers=2) as pool:
        outcomes = pool.run(fn, [(a1,), (a2,)], timeout_s=5.0)   # list[Outcome]

``run`` is thread-safe: concurrent callers share the workers.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

_PRELOAD = ["scalerl.rewards", "math_verify"]
# -c rather than -m: running a package submodule with -m imports it twice (runpy warns).
# Environment variables kept from reward workers (cloud keys, API tokens, passwords).
_SECRET_ENV = re.compile(r"^AWS_|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|AUTH", re.I)
_WORKER_COMMAND = "from scalerl.rewards.sandbox import worker_entry; worker_entry()"
_DETAIL_CHARS = 200
MAX_CHUNK = 16  # items per message to a worker; replies still come one per item


@dataclass(frozen=True)
class Outcome:
    """The result of one call: ``value`` when ok, else ``failure`` and ``detail``."""

    ok: bool
    value: Any = None
    failure: str | None = None
    """"timeout", "crash" or "error" when not ok."""
    detail: str = ""


def _worker_main(conn: _DuplexPipe, memory_limit_bytes: int | None) -> None:
    """The worker's loop: receive (fn, [args, ...]) and reply once per item, in order, with
    ("ok", value) or ("error", text)."""
    # The parent owns shutdown (close() or killing us); Ctrl-C goes to the parent only.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_limit_bytes and sys.platform.startswith("linux"):
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = (
            memory_limit_bytes if hard == resource.RLIM_INFINITY else min(memory_limit_bytes, hard)
        )
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    _watch_parent()
    for module in _PRELOAD:  # import now, so that no item's deadline pays for it
        with contextlib.suppress(ImportError):
            __import__(module)
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent went away
            return
        if message is None:
            return
        fn, items = message
        for args in items:  # one reply per item, as soon as it is done
            try:
                reply: tuple[str, Any] = ("ok", fn(*args))
            except BaseException as exc:  # noqa: BLE001 - any failure is the item's result
                reply = ("error", f"{type(exc).__name__}: {exc}"[:_DETAIL_CHARS])
            try:
                conn.send(reply)
            except (EOFError, OSError):
                return
            except Exception as exc:  # the value could not be pickled
                conn.send(("error", f"result not sendable: {type(exc).__name__}"))


def _watch_parent() -> None:
    """Exit when the parent dies, even mid-item (a pipe EOF is only seen between items).

    A polling thread rather than Linux's PR_SET_PDEATHSIG, which fires when the parent
    *thread* that started us exits: pools are used from short-lived worker threads.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class _DuplexPipe:
    """The worker's end: receive on one pipe, reply on the other."""

    def __init__(self, incoming: Connection, outgoing: Connection) -> None:
        self.recv = incoming.recv
        self.send = outgoing.send


class WorkerStartError(RuntimeError):
    """A scoring worker process could not be started."""


class _Worker:
    """One worker: a fresh interpreter running ``worker_entry`` on two pipes.

    A plain subprocess rather than ``multiprocessing.Process``: spawn/forkserver children
    re-import the caller's ``__main__`` (failing in scripts without a main guard), and
    fork would copy a multi-threaded parent (trainer, Prefect) into the child.
    """

    def __init__(self, memory_limit_bytes: int | None) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # Verifiers get no credentials: a completion the verifier parses is untrusted input.
        env = {k: v for k, v in os.environ.items() if not _SECRET_ENV.search(k)}
        # The child must import whatever the parent can (fn is pickled by reference).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        command = [sys.executable, "-c", _WORKER_COMMAND, str(to_child_r), str(from_child_w)]
        command.append(str(memory_limit_bytes or 0))
        try:
            self.process = subprocess.Popen(
                command,
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the parent only
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.send_conn = Connection(to_child_w, readable=False)
        self.conn = Connection(from_child_r, writable=False)
        self.ready = False

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        try:
            if not self.conn.poll(timeout_s):
                raise WorkerStartError(f"no ready signal within {timeout_s:g} s")
            if self.conn.recv() != "ready":
                raise WorkerStartError("unexpected first message")
        except (EOFError, OSError) as exc:
            raise WorkerStartError(f"it exited during start-up ({type(exc).__name__})") from None
        self.ready = True

    def send(self, message: Any) -> None:
        self.send_conn.send(message)

    def exit_detail(self) -> str:
        try:
            code = self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return "worker stopped answering"
        if code < 0:
            try:
                return f"worker killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"worker killed by signal {-code}"
        return f"worker exited with code {code}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self.send_conn.close()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.send(None)
            self.process.wait(timeout=2)
        except (EOFError, OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class ScoringPool:
    """Process pool with per-item timeouts; kill-and-replace for hung or dead workers."""

    def __init__(
        self,
        workers: int | None = None,
        *,
        memory_limit_mb: int | None = 4096,
        start_timeout_s: float = 60.0,
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}. Fix: pass None for auto.")
        self.workers = workers or max(1, min(os.cpu_count() or 1, 8))
        self.start_timeout_s = start_timeout_s
        self._memory = memory_limit_mb * 2**20 if memory_limit_mb else None
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._closed = False

    # ------------------------------------------------------------------ public
    def run(
        self,
        fn: Callable[..., Any],
        args_list: Sequence[tuple[Any, ...]],
        *,
        timeout_s: float,
    ) -> list[Outcome]:
        """Call ``fn(*args)`` for every args tuple in the workers; one Outcome per item.

        ``fn`` must be importable by reference (a module-level function or builtin).
        Items go to the workers a few per message (MAX_CHUNK); each replies per item, and an
        item's deadline starts when the worker starts it (its previous reply came back). A
        worker that hangs or dies fails only the item it is on; the rest of its items are
        given to other workers.
        """
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}. Fix: e.g. 5.0.")
        self._top_up()
        results: list[Outcome | None] = [None] * len(args_list)
        pending = deque(range(len(args_list)))
        # conn -> (worker, the indices it holds in order, deadline of the first of them)
        in_flight: dict[Connection, tuple[_Worker, deque[int], float]] = {}
        send_failures = 0
        try:
            while pending or in_flight:
                while pending and len(in_flight) < self.workers:
                    worker = self._acquire(block=not in_flight)
                    if worker is None:
                        break
                    chunk = deque(
                        pending.popleft() for _ in range(min(len(pending), self._chunk(pending)))
                    )
                    try:
                        worker.send((fn, [args_list[i] for i in chunk]))
                    except (EOFError, OSError):  # died while idle: not the items' fault
                        self._discard(worker)
                        send_failures += 1
                        if send_failures > self.workers + 2:
                            detail = "no worker would take the item"
                            for i in chunk:
                                results[i] = Outcome(False, failure="crash", detail=detail)
                        else:
                            pending.extendleft(reversed(chunk))
                        continue
                    in_flight[worker.conn] = (worker, chunk, time.monotonic() + timeout_s)
                if not in_flight:
                    continue
                next_deadline = min(d for _, _, d in in_flight.values())
                ready = wait(list(in_flight), timeout=max(0.0, next_deadline - time.monotonic()))
                for conn in ready:
                    worker, chunk, _ = in_flight.pop(conn)  # type: ignore[index]
                    try:
                        while chunk:  # every reply already in the pipe
                            kind, payload = worker.conn.recv()
                            results[chunk.popleft()] = (
                                Outcome(True, value=payload)
                                if kind == "ok"
                                else Outcome(False, failure="error", detail=payload)
                            )
                            if not worker.conn.poll(0):
                                break
                    except (EOFError, OSError):
                        # the worker died on the item it was running; the rest go back
                        detail = worker.exit_detail()
                        results[chunk.popleft()] = Outcome(False, failure="crash", detail=detail)
                        pending.extendleft(reversed(chunk))
                        self._discard(worker)
                        continue
                    if chunk:  # the next item's deadline starts now, as the worker starts it
                        in_flight[conn] = (worker, chunk, time.monotonic() + timeout_s)
                    else:
                        self._release(worker)
                now = time.monotonic()
                for conn, (worker, chunk, deadline) in list(in_flight.items()):
                    if deadline <= now:
                        del in_flight[conn]
                        detail = f"no result after {timeout_s:g} s; worker killed"
                        results[chunk.popleft()] = Outcome(False, failure="timeout", detail=detail)
                        pending.extendleft(reversed(chunk))  # not started: not their fault
                        self._discard(worker)
        finally:
            # Interrupted mid-batch (e.g. KeyboardInterrupt): the in-flight workers are
            # in an unknown state, so they are discarded rather than reused.
            for worker, _, _ in in_flight.values():
                self._discard(worker)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop idle workers now; busy ones stop when their current call returns."""
        with self._lock:
            self._closed = True
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            worker.stop()
            with self._lock:
                self._started -= 1

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- helpers
    def _chunk(self, pending: deque[int]) -> int:
        """Items per send: one message carries several items (a pipe round trip per item
        cost more than scoring it), small enough that the workers share the load evenly."""
        return max(1, min(MAX_CHUNK, -(-len(pending) // (2 * self.workers))))

    def _top_up(self) -> None:
        """Start missing workers without waiting, so their start-ups overlap."""
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError(
                        "ScoringPool is closed. Fix: create a new pool (or do not close "
                        "the shared default pool while scoring)."
                    )
                if self._started >= self.workers:
                    return
                self._started += 1
            try:
                self._idle.put(_Worker(self._memory))
            except BaseException:
                with self._lock:
                    self._started -= 1
                raise

    def _acquire(self, *, block: bool) -> _Worker | None:
        """An idle, ready worker; None if none is free and ``block`` is False."""
        while True:
            self._top_up()
            try:
                worker = self._idle.get(timeout=0.2) if block else self._idle.get_nowait()
            except queue.Empty:
                if not block:
                    return None
                continue  # re-check closed / replace workers discarded meanwhile
            try:
                worker.wait_ready(self.start_timeout_s)
            except WorkerStartError as exc:
                self._discard(worker)
                raise WorkerStartError(
                    f"a reward worker failed to start: {exc}. Fix: check that "
                    f"`{sys.executable} -c 'import scalerl.rewards'` works (see the "
                    "worker's stderr above), or raise start_timeout_s on a slow machine."
                ) from None
            return worker

    def _release(self, worker: _Worker) -> None:
        if self._closed:
            worker.stop()
            with self._lock:
                self._started -= 1
        else:
            self._idle.put(worker)

    def _discard(self, worker: _Worker) -> None:
        """Kill a hung, dead or suspect worker; the next ``_top_up`` starts a fresh one."""
        worker.kill()
        with self._lock:
            self._started -= 1


def worker_entry() -> None:
    """Entry point of a worker process: ``python -c _WORKER_COMMAND IN_FD OUT_FD MEM``."""
    in_fd, out_fd, memory = (int(a) for a in sys.argv[1:4])
    conn = _DuplexPipe(Connection(in_fd, writable=False), Connection(out_fd, readable=False))
    _worker_main(conn, memory or None)
