"""Run a persistent task's body (a generator, the trainer) in its own Python process.

    summary = run_isolated("runtime.generator:generator_body", config, "generator gen0",
                           run_id=run_id, generator_id="gen0")

Why: generators, the trainer and the flow's stages are all Python loops around small torch
calls. As threads of one process they take turns on one interpreter lock: at tiny-cpu scale
the flow process used 1.2 of 2 cores while the trainer waited half of every step for data.
In their own processes they run side by side (PipelineRL's actors are separate processes too).
The Prefect task stays in the flow process and supervises: it starts the child, forwards the
child's log records to the task run's log, and returns the child's result or raises its error,
so retries, states and the UI are unchanged.

How a child starts: it is forked from a fork server (multiprocessing "forkserver") that
imported torch, transformers and the bodies once (PRELOAD: runtime/preload.py, and the task
modules that tasks/__init__.py adds); a fresh interpreter per child would pay about 5 s of
imports each time. The fork server is started at the top of the run flow (start_server), so its
imports overlap prepare_run.

Contract with the child:
- It calls target(config, **kwargs) (target "module:function"), which returns a
  JSON-serializable dict; torch uses pipeline.torch_threads intra-op threads.
- Log records come back over a pipe and go to the task run's log; library output goes to the
  flow process's stderr.
- Its result, or its error as {"type": "module.Class", "message": ...}, comes back over the
  same pipe. The parent raises the same exception class with the same message where it can
  (else IsolatedTaskError), so a bad input reads the same as in-process. A child that dies
  without a result (killed, out of memory) raises IsolatedTaskError with its exit status and
  last log lines; Prefect's task retries apply as before.
- The child exits when the flow process dies (checked every second) and is killed if the
  supervising task is interrupted. SIGKILL of the flow process's group (a node loss) takes it
  and the fork server too.
- It ignores SIGINT and SIGTERM, and the fork server starts with SIGTERM blocked: Ctrl-C, a pod
  stop, systemd and `timeout` signal the whole process group, and the flow process stops its
  children in order through the run's status (a clean stop checkpoints the trainer first), so
  they must not die of the signal first (a killed trainer was retried by Prefect and trained
  on). stop_children() ends them with SIGKILL.
- Chaos (scalerl/faults.py): a kill point hit in the child kills the flow process first, so a
  crash at a generator's or the trainer's seam is still a whole-node loss.

In-process fallback: a memory:// store lives in one process only, so with it (or with
pipeline.isolation = "thread") the body runs on the task's own thread instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from runtime.logs import task_logger
from scalerl.config import RunConfig

PARENT_ENV = "SCALERL_ISOLATED_PARENT"
# Modules the fork server imports once, so that children start as forks with them imported:
# torch, transformers and the bodies (runtime/preload.py); tasks/__init__.py adds its own.
PRELOAD: list[str] = ["runtime.preload"]


class IsolatedTaskError(RuntimeError):
    """The child process failed in a way that cannot be re-raised as its own exception."""


def in_process(config: RunConfig) -> bool:
    """True where the body must run on the caller's thread (see the module docstring)."""
    return config.pipeline.isolation == "thread" or config.storage.url.startswith("memory://")


def start_server() -> None:
    """Start the fork server now (idempotent, returns at once): it imports torch, transformers
    and the task bodies once, in the background, and every child is then a fork of it. A
    fresh interpreter per child would pay that import (about 5 s of CPU) each time."""
    import multiprocessing.forkserver

    _context()
    with _without_main():
        multiprocessing.forkserver.ensure_running()


@contextlib.contextmanager
def _term_blocked():
    """SIGTERM blocked in this thread while a process starts from it: the fork server (started
    here, or restarted by a child's start if it died) inherits the block, and so does every
    child forked from it until _child() ignores SIGTERM; a group's SIGTERM meanwhile stays
    pending and is then dropped (see the module docstring). multiprocessing's resource tracker
    is started first: starting, it unblocks SIGTERM in the calling thread."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def wait_for_server() -> None:
    """Block until the fork server has finished its imports (fork one no-op child)."""
    start_server()
    ctx = _context()
    proc = ctx.Process(target=_noop)
    with _without_main():
        proc.start()
    proc.join()


def _noop() -> None:
    return None


_MAIN_LOCK = threading.Lock()

# Wakes the run flow's loop when a body says it committed something (notify_flow): the loop
# waits on it instead of sleeping through a fixed poll interval, so a new raw shard goes to
# the stages at once without the loop listing the store every few milliseconds.
_ACTIVITY = threading.Event()
_CHILD_HANDLER: _PipeHandler | None = None  # set in an isolated child: its pipe to the parent


# The reverse way: the flow wakes a child that waits on the flow's output (the trainer, on the
# filtered shards the stages commit), so it need not poll the store on a backoff that grows to
# a second while it waits. A child started with wake=True gets a multiprocessing Event;
# in-process (in_process(config)) the waiter shares _WAKE_LOCAL.
_WAKES: set = set()  # the Events of the live children started with wake=True
_WAKE_LOCAL = threading.Event()
_CHILD_WAKE = None  # set in a child started with wake=True: its Event


def notify_children() -> None:
    """Tell the waiting children (the trainer) that the flow committed something for them: a
    filtered shard. Cheap and safe anywhere: no child waiting, nothing happens."""
    _WAKE_LOCAL.set()
    for event in list(_WAKES):
        with contextlib.suppress(OSError, ValueError):
            event.set()


def wait_for_wake(timeout: float) -> bool:
    """Sleep up to `timeout` seconds, ended early by notify_children() in the flow process
    (this process, or the parent of a child started with wake=True); True if woken."""
    event = _CHILD_WAKE if _CHILD_WAKE is not None else _WAKE_LOCAL
    fired = event.wait(timeout)
    event.clear()
    return fired


def notify_flow() -> None:
    """Tell the run flow that new data is committed (a generator's raw shard). In a child the
    message goes up the pipe and the supervising task sets the event; in-process, directly."""
    handler = _CHILD_HANDLER
    if handler is None:
        _ACTIVITY.set()
        return
    with handler.lock, contextlib.suppress(OSError):
        handler.conn.send(("notify",))


def wait_for_activity(timeout: float) -> bool:
    """Block until notify_flow() or `timeout` seconds; True if notified (and re-armed)."""
    fired = _ACTIVITY.wait(timeout)
    _ACTIVITY.clear()
    return fired


@contextlib.contextmanager
def _without_main():
    """multiprocessing re-imports the caller's __main__ in the fork server and in every child
    (so that pickled functions of __main__ resolve). Our children only run runtime.isolated
    code, and a user's script that calls scalerl_run without an `if __name__ == "__main__"`
    guard would start the run again inside them. Leave __main__ out of what is sent."""
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def without_main(name):
        data = original(name)
        for key in ("init_main_from_path", "init_main_from_name", "main_path"):
            data.pop(key, None)
        return data

    with _MAIN_LOCK, _term_blocked():
        spawn.get_preparation_data = without_main
        try:
            yield
        finally:
            spawn.get_preparation_data = original


AF_UNIX_ROOM = 60  # longest temp dir kept for the fork server's socket (AF_UNIX: 107 bytes)


def _short_socket_dir() -> None:
    """The fork server listens on an AF_UNIX socket in multiprocessing's temp dir, under
    TMPDIR; a socket path is limited to 107 bytes, so under a long TMPDIR (a worker's job
    directory, a pytest tmp path) the server cannot start ("AF_UNIX path too long"). Then
    multiprocessing's temp dir goes to the first short writable system temp directory."""
    import atexit
    import multiprocessing.process as mp_process
    import shutil
    import tempfile

    config = mp_process.current_process()._config
    current = config.get("tempdir") or tempfile.gettempdir()
    if len(current) <= AF_UNIX_ROOM:
        return
    for base in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(base) and os.access(base, os.W_OK):
            made = tempfile.mkdtemp(prefix="pymp-", dir=base)
            atexit.register(shutil.rmtree, made, True)
            config["tempdir"] = made
            return


@functools.cache
def _context():
    import multiprocessing

    _short_socket_dir()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def run_isolated(
    target: str,
    config: RunConfig,
    what: str,
    *,
    nice: int = 0,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    wake: bool = False,
    **kwargs: Any,
) -> dict:
    """target(config, **kwargs) in a child process (or in-process, see in_process). `nice`: added
    to the child's CPU niceness (lower priority), e.g. evaluation.nice; ignored in-process.
    `timeout_s`: the child is killed and TimeoutError raised when it has not returned by then
    (a Prefect task timeout cannot interrupt a task running on a worker thread; this can);
    ignored in-process. `env`: variables set in the child only (its CUDA_VISIBLE_DEVICES from
    the run's placement, runtime/common.py process_env); ignored in-process. `wake`: the child
    may wait_for_wake(), woken by notify_children() here (the trainer)."""
    if in_process(config):
        return _resolve(target)(config, **kwargs)
    logger = task_logger()
    spec = {
        "target": target,
        "config": config.model_dump(mode="json"),
        "kwargs": kwargs,
        "torch_threads": config.pipeline.torch_threads,
        "nice": nice,
        "parent": os.getpid(),
        "name": "scalerl-" + what.split()[-1],  # ps/top show it: scalerl-gen0, scalerl-trainer
        # the fork server's environment is the flow process's when the server started; the
        # child gets the caller's as it is now (tests and chaos runs set variables per run)
        "env": {**os.environ, **(env or {})},
    }
    ctx = _context()
    if _CLOSED.is_set():
        raise IsolatedTaskError(
            f"not starting the {what} process: the run flow is stopping its processes (it "
            "could not record its failure in the store). Fix: see the flow's error; resume "
            "the run once it is fixed."
        )
    reader, writer = ctx.Pipe(duplex=False)
    woken = ctx.Event() if wake else None
    proc = ctx.Process(
        target=_child, args=(spec, writer, woken), name=f"scalerl {what}", daemon=False
    )
    tail: deque[str] = deque(maxlen=20)
    outcome = None
    try:
        with _without_main():
            proc.start()
        _LIVE.add(proc)
        if woken is not None:
            _WAKES.add(woken)
        writer.close()  # the child holds the only writer: EOF means it has ended
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            # (once the result is in, the child is only exiting: it is not timed out then)
            late = deadline is not None and outcome is None
            if late and not reader.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(  # the finally below kills the child
                    f"the {what} process did not finish within {timeout_s:g} s. Fix: look at "
                    "its last log lines above; the task is retried, and a resumed run "
                    "continues from what is committed."
                )
            try:
                kind, *payload = reader.recv()
            except EOFError:
                break
            if kind == "log":
                level, message = payload
                logger.log(level, message)
                tail.append(message)
            elif kind == "notify":
                _ACTIVITY.set()
            else:
                outcome = payload[0]
        proc.join()
    finally:
        _LIVE.discard(proc)
        _WAKES.discard(woken)
        reader.close()
        if proc.is_alive():  # the supervising task was interrupted
            proc.kill()
            proc.join()
    if outcome is not None and "ok" in outcome:
        return outcome["ok"]
    if outcome is not None and "error" in outcome:
        raise _rebuild(outcome["error"])
    last = "\n".join(tail) or "(no log output)"
    raise IsolatedTaskError(
        f"the {what} process ended with exit status {proc.exitcode} before reporting a "
        f"result; its last log lines:\n{last}\nFix: see the error above; the task is retried, "
        "and a resumed run continues from what is committed."
    )


_LIVE: set = set()  # child processes that a task of this process supervises now
_CLOSED = threading.Event()  # stop_children() was called: start no more


def stop_children(grace_s: float = 10.0) -> int:
    """End every child process this flow process supervises, and start no more until
    reopen_children(): for a failing flow whose children cannot learn of the failure through
    the store (e.g. the disk is full, so the status cannot be written), and for a stop past its
    grace period (flows.run.hard_stop), so that no supervising task waits forever. An isolated
    child gets SIGKILL at once (it ignores SIGTERM); a torchrun group SIGTERM first, SIGKILL
    after `grace_s`. Returns how many were running."""
    from multiprocessing.process import BaseProcess

    _CLOSED.set()
    procs = [p for p in list(_LIVE) if p.is_alive()]
    for proc in procs:
        (proc.kill if isinstance(proc, BaseProcess) else proc.terminate)()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
    return len(procs)


def supervise(child) -> None:
    """Count `child` (anything with is_alive/terminate/kill/join, e.g. runtime/torchrun.py's
    process group) among the processes stop_children() ends; IsolatedTaskError when the flow is
    stopping them and no new one may start."""
    if _CLOSED.is_set():
        raise IsolatedTaskError(
            "not starting another process: the run flow is stopping its processes (it could "
            "not record its failure in the store). Fix: see the flow's error; resume the run "
            "once it is fixed."
        )
    _LIVE.add(child)


def unsupervise(child) -> None:
    _LIVE.discard(child)


def rebuild_error(error: dict) -> BaseException:
    """The exception a child reported as {"type": "module.Class", "message": ...}."""
    return _rebuild(error)


def reopen_children() -> None:
    """A new run flow in this process may start children again."""
    _CLOSED.clear()


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _rebuild(error: dict) -> BaseException:
    module, _, name = error["type"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(error["message"])
    except Exception:  # noqa: BLE001 - fall back to a generic error with the same text
        pass
    return IsolatedTaskError(f"{error['type']}: {error['message']}")


# -- the child ----------------------------------------------------------------------------------


class _PipeHandler(logging.Handler):
    def __init__(self, conn) -> None:
        super().__init__()
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.conn.send(("log", record.levelno, self.format(record)))
        except Exception:  # noqa: BLE001 - logging must never kill the task
            self.handleError(record)


def _alive(pid: int) -> bool:
    """storage.lease.pid_alive: a killed process that its own parent has not reaped yet (a
    zombie) still answers kill(pid, 0) and counts as dead. Seen: a SIGKILLed `scalerl run` whose
    caller waited for its output pipe, which these children held open, before reaping it:
    neither side ever moved."""
    from storage.lease import pid_alive

    return pid_alive(pid)


def watch_parents(*pids: int) -> None:
    """Exit (status 70) as soon as any of `pids` is gone: nobody supervises this process then.
    An isolated child watches its flow process; a trainer rank also its torchrun agent."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if not all(_alive(pid) for pid in pids):
                os._exit(70)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _child(spec: dict, conn, woken=None) -> None:
    global _CHILD_WAKE
    _CHILD_WAKE = woken
    os.environ.clear()
    os.environ.update(spec["env"])
    os.environ[PARENT_ENV] = str(spec["parent"])  # scalerl/faults.py kills it at a kill point
    with contextlib.suppress(OSError):  # Linux: the name ps, top and bench/soak.py show
        Path("/proc/self/comm").write_text(spec["name"][:15])
    watch_parents(spec["parent"])
    # Ctrl-C and a pod stop reach the whole process group: the flow process stops its children
    # through the run's status (a clean stop checkpoints the trainer), so they must not die of
    # it first. SIGTERM came blocked from the fork server: ignoring it drops one pending.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if spec.get("nice"):
        os.nice(int(spec["nice"]))
    global _CHILD_HANDLER
    handler = _CHILD_HANDLER = _PipeHandler(conn)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    if spec.get("torch_threads"):
        import torch

        torch.set_num_threads(int(spec["torch_threads"]))
    try:
        config = RunConfig.model_validate(spec["config"])
        result: dict = {"ok": _resolve(spec["target"])(config, **spec["kwargs"])}
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        logging.getLogger("scalerl.task").exception("%s failed", spec["target"])
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        result = {"error": {"type": kind, "message": str(exc)}}
    message = ("result", json.loads(json.dumps(result, default=str)))
    with handler.lock:  # a library thread that logs now must not interleave with the result
        conn.send(message)
    conn.close()
    if "error" in result:
        sys.exit(1)
