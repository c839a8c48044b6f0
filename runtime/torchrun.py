"""The trainer under torchrun: placement.trainer_ranks processes, FSDP2 over NCCL (cuda) or gloo (cpu).

    result = run_torchrun(config, run_id)      # what the train-policy task calls when ranks > 1

The train-policy task starts PyTorch's own launcher, not a hand-rolled one:

    python -m torch.distributed.run --standalone --nproc-per-node N --max-restarts 0 \\
        -m runtime.trainer_rank SPEC.json

with CUDA_VISIBLE_DEVICES set to the trainer's devices on this node (scalerl/placement.py), so
LOCAL_RANK r pins the r-th of them; on cpu the ranks join a gloo group. Supervision is the same
contract as runtime/isolated.py's children:

- Every line the ranks print goes to the task run's log (rank 0 logs INFO, the others WARNING
  and up; torchrun's own lines too).
- Rank 0 writes the trainer's summary to SPEC.result.json; a rank that fails writes its error
  (type, message) to SPEC.error-RANK.json. The task returns the summary, or raises the first
  failed rank's exception class with its message (a bad input reads the same as with one rank),
  or IsolatedTaskError with torchrun's exit status and the last lines.
- One rank dying takes the others down (torchrun with --max-restarts 0 stops the whole group
  and exits non-zero); Prefect's task retry then starts a new group, which resumes from the
  newest checkpoint like a single-process trainer.
- The launcher runs in its own session (Ctrl-C reaches the flow, which stops the trainer through
  the run's status, so its last checkpoint is written); an interrupted task kills the whole
  session; every rank exits by itself when the flow process or its torchrun agent is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from runtime.isolated import (
    PARENT_ENV,
    IsolatedTaskError,
    rebuild_error,
    supervise,
    task_logger,
    unsupervise,
)
from scalerl.config import RunConfig


class _Launched:
    """A torchrun process group as runtime/isolated.py's stop_children sees a child."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)


@dataclass(frozen=True)
class NodeRole:
    """This machine's part of a trainer over several nodes (placement.trainer_deployment)."""

    rank: int  # the node's index among the trainer's flow runs (node 0 publishes the endpoint)
    nodes: int
    endpoint: str  # c10d rendezvous HOST:PORT
    attempt: str  # the rendezvous id: one per start of the trainer
    hosts_store: bool | None = None  # whether this node hosts the c10d store; None: torch decides


def torchrun_command(config: RunConfig, spec: Path, node: NodeRole | None = None) -> list[str]:
    ranks = config.placement.trainer_ranks
    if node is None:
        where = ["--standalone", f"--nproc-per-node={ranks}"]
    else:  # ranks are assigned by the rendezvous; every node runs ranks / nodes of them
        where = [
            f"--nnodes={node.nodes}",
            f"--nproc-per-node={ranks // node.nodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={node.endpoint}",
            f"--rdzv-id={node.attempt}",
        ]
        if node.hosts_store is not None:  # node 0 published its own address: it hosts
            where.append(f"--rdzv-conf=is_host={str(node.hosts_store).lower()}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        "--max-restarts=0",
        "--monitor-interval=0.5",
        "-m",
        "runtime.trainer_rank",
        str(spec),
    ]


def run_torchrun(
    config: RunConfig,
    run_id: str,
    env: dict[str, str] | None = None,
    node: NodeRole | None = None,
) -> dict:
    """The trainer as placement.trainer_ranks ranks under torchrun, supervised by this task;
    with `node`, this machine's ranks of a trainer over several nodes (its rank 0 may be on
    another node: then this returns {"node": ..., "summary": None})."""
    logger = task_logger()
    with tempfile.TemporaryDirectory(prefix=f"scalerl-{run_id}-torchrun-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "config": config.model_dump(mode="json"),
                    "run_id": run_id,
                    "torch_threads": config.pipeline.torch_threads,
                    "attempt": None if node is None else node.attempt,
                }
            )
        )
        child_env = {**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())}
        child_env.setdefault("OMP_NUM_THREADS", str(config.pipeline.torch_threads or 1))
        child_env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no tqdm lines in the log
        proc = subprocess.Popen(
            torchrun_command(config, spec, node),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=child_env,
            start_new_session=True,
        )
        launched = _Launched(proc)
        tail: deque[str] = deque(maxlen=20)
        try:
            supervise(launched)  # stop_children() ends the group too
            _relay(proc, logger, tail)
            code = proc.wait()
        finally:
            unsupervise(launched)
            if proc.poll() is None:  # the supervising task was interrupted
                launched.kill()
                proc.wait()
        result = Path(f"{spec}.result.json")
        if code == 0 and result.exists():
            return json.loads(result.read_text())
        if code == 0 and node is not None:  # rank 0 ran on another node: it reports the run's
            return {"node": node.rank, "summary": None}
        errors = sorted(Path(tmp).glob("spec.json.error-*.json"), key=lambda p: p.stat().st_mtime)
        if errors:
            raise rebuild_error(json.loads(errors[0].read_text()))
    last = "\n".join(tail) or "(no output)"
    raise IsolatedTaskError(
        f"the trainer's torchrun group ({config.placement.trainer_ranks} ranks) ended with exit "
        f"status {code} before reporting a result; its last lines:\n{last}\nFix: see the error "
        "above; the task is retried, and the trainer resumes from its newest checkpoint."
    )


def _relay(proc: subprocess.Popen, logger, tail: deque) -> None:
    """Every line of the group's output to the task's log (from a thread: the task's own thread
    keeps the process handle, and a rank that floods its output cannot block the others)."""

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line:
                logger.info(line)
                tail.append(line)

    reader = threading.Thread(target=pump, name="torchrun-log", daemon=True)
    reader.start()
    while reader.is_alive():  # until the last process holding the pipe has exited
        reader.join(0.5)
