"""S3 outage: the S3-protocol endpoint stops answering for 20 s in the middle of a run and comes
back; every process of the run waits it out (storage/retry.py) and the run completes, verifies
clean and ends `finished`.

How the outage is made, and why this way: moto_server keeps its state in memory and has no
option to persist it (`moto_server --help`: host, port, reload, SSL only), so stopping and
restarting it would come back with an empty bucket: a data-loss event, not an outage. Instead
the run talks to the server through a small TCP forwarder owned by the test (`Endpoint`). To
cut the endpoint, the forwarder closes its listening socket, so new connections are refused
exactly as from a stopped server, and resets every open connection, so requests in flight fail
exactly as when a server process dies. To restore it, it listens again on the same port. For a
client this is indistinguishable from the server process stopping and starting again with its
data intact (what a real S3 service or a MinIO restart looks like).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from runtime.verify import verify_run
from storage import open_store
from storage.errors import InvalidInputError, StorageUnreachableError

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
OUTAGE_S = 20.0
S3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class Endpoint:
    """A TCP forwarder 127.0.0.1:port -> upstream that can be cut (refuse + reset) and restored."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """New connections are refused; open ones are closed (as the kernel closes the sockets
        of a server process that dies). shutdown() first: it wakes the threads blocked in
        accept()/recv() on them, which close() alone does not."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns -= {src, dst}

    def close(self) -> None:
        self.down()


@pytest.fixture
def endpoint(moto_endpoint):
    host, port = moto_endpoint.removeprefix("http://").split(":")
    ep = Endpoint((host, int(port)))
    try:
        yield ep
    finally:
        ep.close()


def _options(endpoint_url: str) -> dict:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint_url}}


def test_a_store_call_waits_out_an_outage_of_an_endpoint_that_answered(endpoint):
    url = f"s3://scalerl-test/{uuid.uuid4().hex[:8]}/runs"
    run = open_store(url, storage_options=_options(endpoint.url)).run("r1", create=True)
    run.write_marker("m", {"n": 0})
    endpoint.down()
    threading.Timer(3.0, endpoint.up).start()
    start = time.monotonic()
    run.write_marker("m", {"n": 1})  # during the outage
    took = time.monotonic() - start
    assert 2.5 <= took < 20, took
    assert run.read_marker("m") == {"n": 1}


def test_an_endpoint_that_never_answered_fails_at_once(endpoint):
    endpoint.down()
    store = open_store("s3://scalerl-test/never", storage_options=_options(endpoint.url))
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError, match="does not answer"):
        store.run("r1", create=True)
    assert time.monotonic() - start < 15


def test_the_wait_is_bounded_by_the_configured_window(endpoint, monkeypatch):
    run = open_store(
        f"s3://scalerl-test/{uuid.uuid4().hex[:8]}/runs", storage_options=_options(endpoint.url)
    ).run("r1", create=True)
    endpoint.down()
    monkeypatch.setenv("SCALERL_STORAGE_RETRY_S", "2")
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError):
        run.read_status()
    # backoff 0.5 + 1 s fits the 2 s window, the next 2 s wait would not: three attempts
    assert 1.4 <= time.monotonic() - start < 10
    monkeypatch.setenv("SCALERL_STORAGE_RETRY_S", "soon")
    with pytest.raises(InvalidInputError, match="SCALERL_STORAGE_RETRY_S='soon'.*Fix"):
        run.read_status()


def _one_row_shard(run_id: str, key: str):
    from storage import rollouts_from_records

    return rollouts_from_records(
        [
            {
                "run_id": run_id, "shard_id": key, "prompt_id": "p0", "group_id": f"{key}-g0",
                "sample_index": 0, "task": "arith", "prompt": "1+1?", "prompt_token_ids": [1],
                "answer": "2", "completion": "2", "completion_token_ids": [5], "logprobs": [-0.1],
                "versions": [0], "finish_reason": "stop", "thinking_tokens": 0,
                "answer_tokens": 1, "generator_id": "gen0", "started_at": 0.0,
                "finished_at": 1.0,
            }
        ]
    )  # fmt: skip


def test_unreachable_storage_is_never_taken_for_a_corrupt_shard(endpoint, monkeypatch):
    from runtime.trainer_io import RunShardSource
    from tasks.stages import read_or_quarantine

    url = f"s3://scalerl-test/{uuid.uuid4().hex[:8]}/runs"
    run = open_store(url, storage_options=_options(endpoint.url)).run("r1", create=True)
    for stage in ("raw", "filtered"):
        run.commit_shard(stage, "k0", _one_row_shard("r1", "k0"))
    source = RunShardSource(run, "filtered")
    assert source.list_ready() == ["k0"]
    monkeypatch.setenv("SCALERL_STORAGE_RETRY_S", "0")  # fail at once instead of waiting
    endpoint.down()
    with pytest.raises(StorageUnreachableError):
        read_or_quarantine(run, "raw", "k0", "test")
    with pytest.raises(StorageUnreachableError):  # not ShardRejected: the task retries it
        source.read("k0")
    endpoint.up()
    assert run.list_quarantined() == [] and run.has_shard("raw", "k0")
    assert source.read("k0").num_rows == 1


SCRIPT = """
import sys
from scalerl.config import load_config
from flows.run import scalerl_run
if __name__ == "__main__":
    url, endpoint, run_id = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = load_config(preset="tiny-cpu", overrides=[
        f"storage.url={url}", f"storage.endpoint_url={endpoint}", f"storage.run_id={run_id}",
        "schedule.max_steps=4", "trainer.checkpoint_every=2", "evaluation.every_steps=100",
        "data.num_eval_prompts=8"])
    scalerl_run(cfg)
"""


def test_the_run_completes_across_a_20_s_outage(prefect_server, endpoint, moto_endpoint, tmp_path):
    url, run_id = f"s3://scalerl-test/{uuid.uuid4().hex[:8]}/runs", "outage"
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, url, endpoint.url, run_id],
            env={**prefect_server, **S3},
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # The test watches the run directly (not through the cut endpoint).
    watch = open_store(url, storage_options=_options(moto_endpoint))
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach step 1 in time"
            with contextlib.suppress(Exception):
                if (watch.run(run_id).latest_weights_version() or 0) >= 1:
                    break
            time.sleep(0.2)
        run = watch.run(run_id)
        before = {s.key: s.committed_at for s in run.list_shards("raw")}
        cut_at_version = run.latest_weights_version()
        endpoint.down()
        time.sleep(OUTAGE_S)
        during = run.latest_weights_version()
        endpoint.up()
        assert proc.wait(timeout=480) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    found = re.findall(r"answers again after ([0-9.]+) s \((\S+)\)", text)
    waits, calls = [float(w) for w, _ in found], {c for _, c in found}
    print(
        f"outage {OUTAGE_S:.0f} s: {len(waits)} store calls waited it out, longest "
        f"{max(waits, default=0):.1f} s: {sorted(calls)}"
    )
    # the outage was felt by the run's processes and ridden out: the first calls to hit it
    # (every component polls at least once a second) waited almost all of it
    assert waits and max(waits) >= OUTAGE_S - 5, text[-3000:]
    assert during == cut_at_version  # nothing could be published while the endpoint was cut
    assert run.read_status()["state"] == "finished"
    assert run.list_weight_versions() == list(range(5))
    after = {s.key: s.committed_at for s in run.list_shards("raw")}
    assert {k: after.get(k) for k in before} == before  # nothing committed was lost or rewritten
    report = verify_run(run)
    assert report.ok, report.problems
    assert report.facts["checkpoint_step"] == 4
