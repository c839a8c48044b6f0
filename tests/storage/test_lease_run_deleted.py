"""A run deleted while its writer runs (issue 30, item 5), on the store layer: the writer's
heartbeat and every write under its lease (the flow's, and its children's through
$SCALERL_LEASE) raise RunDeletedError, one line with the fix, and nothing re-creates the run,
on local disk and on the S3-protocol server. The whole-run test is tests/e2e/test_run_deleted.py.
"""

from __future__ import annotations

import time

import pytest

from runtime.writer import RunWriter
from storage import lease as leases
from storage import open_store
from storage.errors import RunDeletedError, RunNotFoundError


@pytest.fixture(autouse=True)
def _no_inherited_lease(monkeypatch):
    monkeypatch.delenv(leases.ENV, raising=False)


def _open(backend, run_id="doomed", create=False):
    url, options = backend
    return open_store(url, storage_options=options).run(run_id, create=create)


def _expected(backend, run_id="doomed") -> str:
    url = backend[0]
    return (
        f"run {run_id} was deleted from {url} while it ran: its writer stops and writes nothing "
        "more (a deleted run is never re-created). Fix: if that was a mistake, restore the "
        f"run's directory from a copy and `scalerl resume {run_id}`; otherwise start a new run "
        "(`scalerl run`)."
    )


def _files(run) -> list[str]:
    fs = run._loc.fs
    return fs.find(run._root) if fs.exists(run._root) else []


def test_the_writer_and_its_children_stop_and_recreate_nothing(cross_process_backend, monkeypatch):
    run = _open(cross_process_backend, create=True)
    held = run.acquire_lease({"flow_run_id": "fr-1"})
    run.write_status({"state": "running"})
    monkeypatch.setenv(leases.ENV, held.env())
    child = _open(cross_process_backend)  # a trainer process: it writes under the lease
    child.write_marker("trainer-intake", {"shards_read": 0})

    run._loc.fs.rm(run._root, recursive=True)  # rm -rf R/RUN
    assert _files(run) == []
    time.sleep(leases.CHECK_EVERY_S)  # on S3 a writer looks at most once a second

    for write in (
        held.heartbeat,
        lambda: child.write_marker("trainer-intake", {"shards_read": 1}),
        lambda: child.append_metrics("trainer", [{"step": 1, "loss": 0.5}]),
        lambda: run.write_status({"state": "failed"}),
    ):
        with pytest.raises(RunDeletedError) as err:
            write()
        assert str(err.value) == _expected(cross_process_backend)
        assert isinstance(err.value, RunNotFoundError) and isinstance(err.value, ValueError)
    held.release()  # quietly nothing: there is no run to release
    assert _files(run) == []  # nothing re-created: no lease/, markers/, metrics/, status
    url, options = cross_process_backend
    assert open_store(url, storage_options=options).list_runs() == []


def test_the_lease_knows_the_run_marker_by_its_name():
    from storage.store import RUN_MARKER

    assert leases.RUN_MARKER == RUN_MARKER  # (storage.store imports storage.lease)


def test_the_run_flows_heartbeat_reports_the_deletion(cross_process_backend, monkeypatch):
    """runtime/writer.py: the heartbeat thread notices (every heartbeat_s()) and check(), which
    the flow's loop calls, raises RunDeletedError."""
    monkeypatch.setenv(leases.TTL_ENV, "1.2")  # heartbeat_s() = 0.2 s
    run = _open(cross_process_backend, create=True)
    writer = RunWriter(run, {"flow_run_id": "fr-1"})
    try:
        writer.check()  # held
        run._loc.fs.rm(run._root, recursive=True)
        deadline = time.monotonic() + 10
        while not writer.lost.is_set():
            assert time.monotonic() < deadline, "the heartbeat did not notice"
            time.sleep(0.05)
        with pytest.raises(RunDeletedError, match="^run doomed was deleted from "):
            writer.check()
    finally:
        writer.release()
    assert _files(run) == []
