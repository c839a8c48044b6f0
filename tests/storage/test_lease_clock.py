"""The run's lease does not depend on two machines' clocks agreeing (issue 30, item 3).

Real processes over a real store (local disk, and the S3-protocol server): a holder that
heartbeats, and two would-be takers whose Python clocks (time.time) run 600 s ahead and 600 s
behind. Expiry is judged on the store's clock only (storage/lease.py), so while the holder
heartbeats both takers are refused, and once it really stops heartbeating (SIGSTOP: alive, but
silent) the one whose clock lags takes it over after the TTL, not 600 s later; the holder, woken,
learns it was taken over and stops. The TTL is 5 s here (SCALERL_LEASE_TTL_S), so the holder
beats every 5/6 s (heartbeat_s: TTL / 6)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import lease as leases
from storage import open_store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TTL = 5.0  # long enough that a heartbeat delayed by a loaded machine is not a stop
BEAT = TTL / 6  # what leases.heartbeat_s() gives for this TTL (written out: old code lacks it)
SKEW = 600.0
TTL_ENV = "SCALERL_LEASE_TTL_S"  # leases.TTL_ENV

# argv: clock shift (s), store URL, storage options (JSON), run id, role (hold | take), beat (s)
SCRIPT = r"""
import json, sys, time
_real = time.time
time.time = lambda: _real() + float(sys.argv[1])  # this machine's clock is off
from storage import lease as leases
from storage import open_store
url, options, run_id, role = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
BEAT = float(sys.argv[6])
run = open_store(url, storage_options=options).run(run_id, create=True)
if role == "hold":
    held = run.acquire_lease({"flow_run_id": "holder"})
    print("held", flush=True)
    try:
        while True:
            time.sleep(BEAT)
            held.heartbeat()
    except leases.LeaseLostError as e:
        print("lost:", e, flush=True)
        sys.exit(3)
print("ready", flush=True)
for _ in sys.stdin:  # one attempt per line
    try:
        got = run.acquire_lease({"flow_run_id": "taker" + sys.argv[1]})
        print(json.dumps({"took": got.generation}), flush=True)
    except leases.LeaseHeldError as e:
        print(json.dumps({"refused": str(e)}), flush=True)
"""


def _start(shift: float, backend, run_id: str, role: str) -> subprocess.Popen:
    url, options = backend
    env = {k: v for k, v in os.environ.items() if k != leases.ENV}
    env.update({TTL_ENV: str(TTL), "PYTHONPATH": str(REPO)})
    argv = [str(shift), url, json.dumps(options), run_id, role, str(BEAT)]
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *argv],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line, f"process {proc.pid} ended (exit {proc.wait()})"
    return line.strip()


def _try(taker: subprocess.Popen) -> dict:
    taker.stdin.write("try\n")
    taker.stdin.flush()
    return json.loads(_line(taker))


def test_a_skewed_clock_neither_takes_a_live_run_nor_waits_past_the_ttl(cross_process_backend):
    run_id = "skew"
    holder = _start(0.0, cross_process_backend, run_id, "hold")
    ahead = behind = None
    try:
        assert _line(holder) == "held"
        ahead = _start(+SKEW, cross_process_backend, run_id, "take")
        behind = _start(-SKEW, cross_process_backend, run_id, "take")
        assert _line(ahead) == "ready" and _line(behind) == "ready"
        time.sleep(1.5)  # three heartbeats

        # A live holder: refused both ways, and the message's heartbeat age is the true one
        # (at most a heartbeat interval plus S3's whole-second rounding, never ~600 s).
        for taker in (ahead, behind):
            answer = _try(taker)
            assert "refused" in answer, answer
            message = answer["refused"]
            assert f"pid {holder.pid} on " in message and "(Prefect flow run holder)" in message
            age = int(re.search(r"heartbeat (\d+) s ago", message).group(1))
            assert 0 <= age <= TTL, message
            assert f"taken over {TTL:.0f} s after its last heartbeat" in message

        # The holder stops heartbeating (alive, so not "its process is gone"): still held
        # within the TTL, even for the clock 600 s ahead ...
        holder.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        assert "refused" in _try(ahead)
        # ... and free after it, even for the clock 600 s behind: TTL + 2 s (S3's whole
        # seconds: the store's age is at least TTL + 2 - 1 s > TTL).
        time.sleep(max(0.0, stopped + TTL + 2.0 - time.monotonic()))
        assert _try(behind) == {"took": 2}
        assert "refused" in _try(ahead)  # the new holder is live (same host, pid alive)

        holder.send_signal(signal.SIGCONT)  # the old writer wakes: its next beat says lost
        assert holder.wait(timeout=30) == 3
        lost = holder.stdout.read()
        assert lost.startswith("lost: run skew was taken over by pid "), lost
        assert f"pid {behind.pid} on " in lost
    finally:
        for proc in (holder, ahead, behind):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
    url, options = cross_process_backend
    run = open_store(url, storage_options=options).run(run_id)
    assert run.lease_holder()["generation"] == 2
    probes = [p for p in run._loc.fs.ls(f"{run._root}/lease") if "/.probe-" in p]
    assert probes == []  # the takers' probes are gone
