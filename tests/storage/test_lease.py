"""One writer per run: the lease in the run store (storage/lease.py), on local disk, memory and
the S3-protocol server. Only conditional creates decide who holds it."""

import json
import os
import socket
import subprocess
import threading
import time

import pytest

from storage import lease as leases
from storage import open_store
from storage.errors import StoreError


def _run(backend, run_id="r1"):
    url, options = backend
    return open_store(url, storage_options=options).run(run_id, create=True)


def _age(run, generation, seconds, monkeypatch):
    """Make the holder of `generation` silent for longer than the TTL, on the store's clock:
    the TTL is made shorter than `seconds` and that much time passes (S3 times are whole
    seconds, so at least 2 s)."""
    monkeypatch.setenv(leases.TTL_ENV, str(max(0.5, seconds - 1.5)))
    time.sleep(seconds)


@pytest.fixture(autouse=True)
def _no_inherited_lease(monkeypatch):
    monkeypatch.delenv(leases.ENV, raising=False)


def test_a_second_writer_is_refused_with_the_holder_named(backend):
    first = _run(backend).acquire_lease({"flow_run_id": "fr-1"})
    assert first.generation == 1
    with pytest.raises(leases.LeaseHeldError) as err:
        _run(backend).acquire_lease({"flow_run_id": "fr-2"})
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, ValueError)
    assert f"pid {os.getpid()} on {socket.gethostname()} (Prefect flow run fr-1)" in message
    assert "Fix: wait for that run to end" in message
    assert f"taken over {leases.TTL_S:.0f} s after its last heartbeat" in message


def test_an_expired_holder_is_taken_over_and_stops_writing(backend, monkeypatch):
    run = _run(backend)
    old = run.acquire_lease()
    run.write_status({"state": "running"})  # the holder writes
    _age(run, 1, 2.1, monkeypatch)  # no heartbeat for longer than the TTL
    new_run = _run(backend)
    new = new_run.acquire_lease()
    assert new.generation == 2 and new.doc["took_over"] == 1
    with pytest.raises(leases.LeaseLostError, match="taken over by pid"):
        old.check(force=True)
    run._lease._checked_at = 0.0  # (check() looks at most once a second)
    with pytest.raises(leases.LeaseLostError):
        run.write_status({"state": "failed"})  # the old writer's commits are refused
    assert new_run.read_status() == {"state": "running"}
    new_run.write_status({"state": "stopping"})
    with pytest.raises(leases.LeaseLostError):
        old.heartbeat()


def test_a_released_lease_is_free_at_once_and_a_heartbeat_extends_it(backend):
    run = _run(backend)
    held = run.acquire_lease()
    before = held.doc["heartbeat_at"]
    time.sleep(0.01)
    held.heartbeat()
    assert held.doc["heartbeat_at"] > before
    assert run.lease_holder()["heartbeat_at"] == held.doc["heartbeat_at"]
    held.release()
    assert _run(backend).acquire_lease().generation == 2  # no wait for the expiry


def test_a_dead_holder_on_this_host_and_a_retried_flow_run_are_taken_over(backend):
    run = _run(backend)
    dead = subprocess.Popen(["true"])
    dead.wait()
    held = run.acquire_lease({"flow_run_id": "fr-1"})
    path = f"{run._root}/lease/{held.generation:012d}.json"
    doc = json.loads(run._loc.fs.cat_file(path))
    run._loc.fs.pipe_file(path, json.dumps({**doc, "pid": dead.pid}).encode())
    assert leases.free_reason({**doc, "pid": dead.pid}, flow_run_id=None) == "its process is gone"
    assert _run(backend).acquire_lease().generation == 2
    # a Retry of the same Prefect flow run: the attempt before it has ended
    assert leases.free_reason(doc, flow_run_id="fr-1") == "an earlier attempt of this flow run"
    assert leases.free_reason(doc, flow_run_id="fr-2") is None  # alive, another flow run
    assert leases.free_reason(doc, flow_run_id="fr-2", age=leases.TTL_S) == "expired"
    assert leases.free_reason(doc, flow_run_id="fr-2", age=leases.TTL_S - 1) is None


def test_of_racing_writers_exactly_one_wins(backend):
    """Eight threads try to take a free lease at once: one generation each can be created
    exclusively, so one succeeds and seven are refused."""
    _run(backend)
    start, won, refused = threading.Barrier(8), [], []

    def contend():
        run = _run(backend)
        start.wait()
        try:
            won.append(run.acquire_lease().generation)
        except leases.LeaseHeldError:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7


def test_children_inherit_the_lease_and_readers_never_check(backend, monkeypatch):
    run = _run(backend)
    held = run.acquire_lease()
    monkeypatch.setenv(leases.ENV, held.env())
    child = _run(backend)  # a generator or trainer process opening the run
    assert child._lease is not None and child._lease.generation == held.generation
    assert _run(backend, "other")._lease is None  # the variable names another run
    _age(run, 1, 2.1, monkeypatch)
    monkeypatch.delenv(leases.ENV)
    _run(backend).acquire_lease()
    with pytest.raises(leases.LeaseLostError):
        child.write_marker("x", {"a": 1})
    reader = _run(backend)
    assert reader._lease is None and reader.read_status() is None
    assert isinstance(leases.LeaseLostError("x"), StoreError)
