"""Fixtures for the storage tests: a real S3-protocol server (moto_server on loopback),
store URLs for each backend, and a rollout-table factory."""

from __future__ import annotations

import datetime as dt
import uuid

import numpy as np
import pytest

from storage import rollouts_from_records


@pytest.fixture(scope="session")
def s3_options(moto_endpoint):
    """storage_options for the session's moto_server (bucket 'scalerl-test')."""
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto_endpoint}}


@pytest.fixture(
    params=["local", "memory", pytest.param("s3", marks=pytest.mark.integration)],
)
def backend(request, tmp_path):
    """(url, storage_options) of an empty store on each backend."""
    if request.param == "local":
        return str(tmp_path / "runs"), None
    if request.param == "memory":
        return f"memory://t-{uuid.uuid4().hex[:8]}/runs", None
    return f"s3://scalerl-test/{uuid.uuid4().hex[:8]}/runs", request.getfixturevalue("s3_options")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def cross_process_backend(request, tmp_path):
    """Backends visible from another process (memory:// is not)."""
    if request.param == "local":
        return str(tmp_path / "runs"), None
    return f"s3://scalerl-test/{uuid.uuid4().hex[:8]}/runs", request.getfixturevalue("s3_options")


def make_rollouts_table(run_id: str, shard_id: str, n: int = 6, tokens: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    records = []
    for i in range(n):
        length = int(rng.integers(1, tokens + 1))
        versions = sorted(int(v) for v in rng.integers(0, 4, length))
        records.append(
            {
                "run_id": run_id,
                "shard_id": shard_id,
                "prompt_id": f"p{i // 2}",
                "group_id": f"{shard_id}-g{i // 2}",
                "sample_index": i % 2,
                "task": "arith",
                "prompt": f"What is {i} + {i}?",
                "prompt_token_ids": [1, 2, i],
                "answer": str(2 * i),
                "completion": "x" * length,
                "completion_token_ids": [int(x) for x in rng.integers(0, 1000, length)],
                "logprobs": [float(x) for x in -rng.random(length)],
                "versions": versions,
                "finish_reason": ["stop", "length", "interrupted"][i % 3],
                "thinking_tokens": length // 2,
                "answer_tokens": length - length // 2,
                "generator_id": "gen0",
                "started_at": t0,
                "finished_at": t0 + dt.timedelta(seconds=i),
            }
        )
    return rollouts_from_records(records)


@pytest.fixture
def make_rollouts():
    return make_rollouts_table
