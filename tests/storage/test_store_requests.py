"""Store requests on the hot paths, counted on a real S3-protocol server (moto_server) by the
latency bench's proxy (bench/store_latency.py LatencyProxy: every HTTP request between s3fs and
the server, by kind). Each count is checked against a formula written here, so a change that
adds a round trip to a path run per step or per shard fails:

- a small document (marker, status) is one GET, present or absent (s3fs alone: a HEAD first,
  and a HEAD + LIST for an absent key);
- whether a shard is committed is one request;
- the trainer's poll of its stage (RunShardSource.list_ready) is one LIST plus one GET per
  record not seen before; reading a listed shard is one GET (the record came with the
  listing) plus the intake marker's PUT;
- the generator gate's look (intake marker + count of raw shards) is one GET and one LIST.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from runtime.trainer_io import INTAKE_MARKER, RunShardSource
from storage import open_store, rollouts_from_records

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("store_latency", REPO / "bench/store_latency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("store_latency", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def proxy(moto_endpoint):
    host, port = moto_endpoint.removeprefix("http://").split(":")
    p = _bench().LatencyProxy((host, int(port)))
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def run(proxy):
    options = {"key": "t", "secret": "t", "client_kwargs": {"endpoint_url": proxy.url}}
    url = f"s3://scalerl-test/{uuid.uuid4().hex[:8]}/runs"
    return open_store(url, storage_options=options).run("r1", create=True)


def _shard(key: str):
    return rollouts_from_records(
        [
            {
                "run_id": "r1", "shard_id": key, "prompt_id": "p0", "group_id": f"{key}-g0",
                "sample_index": 0, "task": "arith", "prompt": "1+1?", "prompt_token_ids": [1],
                "answer": "2", "completion": "2", "completion_token_ids": [5], "logprobs": [-0.1],
                "versions": [0], "finish_reason": "stop", "thinking_tokens": 0,
                "answer_tokens": 1, "generator_id": "gen0", "started_at": 0.0,
                "finished_at": 1.0,
            }
        ]
    )  # fmt: skip


def requests(proxy, fn) -> Counter:
    """Requests `fn()` sent, by kind (list, get, head, put, delete, post)."""
    proxy.reset()
    fn()
    out: Counter = Counter()
    for (kind, _area), n in proxy.snapshot().items():
        out[kind] += n
    return out


def test_a_small_document_is_one_get_present_or_absent(proxy, run):
    run.write_marker("m", {"n": 1})
    run.write_status({"state": "running"})
    assert requests(proxy, lambda: run.read_marker("m")) == {"get": 1}
    assert requests(proxy, lambda: run.read_marker("absent")) == {"get": 1}
    assert requests(proxy, run.read_status) == {"get": 1}


def test_whether_a_shard_is_committed_is_one_request(proxy, run):
    run.commit_shard("raw", "gen0-000000", _shard("gen0-000000"))
    assert sum(requests(proxy, lambda: run.has_shard("raw", "gen0-000000")).values()) == 1
    assert sum(requests(proxy, lambda: run.has_shard("raw", "gen0-000001")).values()) == 1
    assert sum(requests(proxy, lambda: run.has_shard("scored", "gen0-000000")).values()) == 1


def test_a_trainer_step_costs_a_listing_per_poll_and_two_gets_and_a_put_per_shard(proxy, run):
    committed = 3
    for i in range(committed):
        run.commit_shard("filtered", f"gen0-{i:06d}", _shard(f"gen0-{i:06d}"))
    source = RunShardSource(run, "filtered")
    read = set(source.list_ready())  # the first poll also counts the stage's quarantined keys
    # a poll that finds nothing new: one listing, nothing read
    assert requests(proxy, source.list_ready) == {"list": 1}

    # one step: `new` shards were committed; the trainer polls `polls` times, reads each new
    # shard once (as Trainer.ingest does), then takes its batch (note_step)
    new, polls = 2, 3
    for i in range(committed, committed + new):
        run.commit_shard("filtered", f"gen0-{i:06d}", _shard(f"gen0-{i:06d}"))

    def step():
        for _ in range(polls):
            for key in source.list_ready():
                if key not in read:
                    read.add(key)
                    source.read(key)
        source.note_step(1)

    # a listing per poll; per new shard its record (with the first listing that shows it) and
    # its data; the intake marker after each read and at the batch
    assert requests(proxy, step) == {"list": polls, "get": 2 * new, "put": new + 1}


def test_the_generator_gate_looks_with_one_get_and_one_listing(proxy, run):
    run.commit_shard("raw", "gen0-000000", _shard("gen0-000000"))
    run.write_marker(INTAKE_MARKER, {"stage": "filtered", "shards_read": 0, "next_step": 1})
    run.count_shards("raw")  # the stage layout check, once a minute at most

    def look():
        run.read_marker(INTAKE_MARKER)
        run.count_shards("raw")

    assert requests(proxy, look) == {"get": 1, "list": 1}


def test_a_metrics_poll_fetches_only_the_parts_it_has_not_read(proxy, run):
    for step in range(3):
        run.append_metrics("trainer", [{"step": step, "loss": 1.0 / (step + 1)}])
    parts: dict = {}
    first = run.read_metrics("trainer", parts_seen=parts)
    assert len(parts) == 3
    # nothing new: one listing, no part fetched again
    assert requests(proxy, lambda: run.read_metrics("trainer", parts_seen=parts)) == {"list": 1}
    run.append_metrics("trainer", [{"step": 1, "loss": 7.0}, {"step": 3, "loss": 0.25}])
    got = {}
    n = requests(proxy, lambda: got.update(t=run.read_metrics("trainer", parts_seen=parts)))
    assert n == {"list": 1, "get": 1}  # the one new part
    # the same rows as a full read: the last row per step wins across cached and new parts
    assert got["t"].to_pylist() == run.read_metrics("trainer").to_pylist()
    assert [(r["step"], r["loss"]) for r in got["t"].to_pylist()] == [
        (0, 1.0), (1, 7.0), (2, 1.0 / 3), (3, 0.25)
    ]  # fmt: skip
    assert first.num_rows == 3
