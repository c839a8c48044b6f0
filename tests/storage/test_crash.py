"""Writers killed with SIGKILL mid-write leave nothing visible; clean_orphans removes the
leftovers; the next writer succeeds. The writer is a subprocess that sleeps at a named
fault point (SCALERL_STORAGE_FAULT), so the kill lands at a known place, not by timing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from storage import open_store
from storage.errors import ShardNotFoundError

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import json, sys
import numpy as np, pyarrow as pa
sys.path.insert(0, sys.argv[4])
from storage import open_store, rollouts_from_records
url, options, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
run = open_store(url, storage_options=options).run("r1", create=True)

def table(key, n, tokens):
    rng = np.random.default_rng(len(key))
    ids = [rng.integers(0, 2**31 - 1, tokens, dtype=np.int32).tolist() for _ in range(n)]
    return rollouts_from_records([dict(
        run_id="r1", shard_id=key, prompt_id=f"p{i}", group_id="g", sample_index=i, task="t",
        prompt="q", prompt_token_ids=[1], completion="c", completion_token_ids=ids[i],
        logprobs=[-1.0] * tokens, versions=[0] * tokens, finish_reason="stop",
        thinking_tokens=0, answer_tokens=tokens, generator_id="g0",
        started_at=0.0, finished_at=1.0) for i in range(n)])

if mode == "big-shard":
    run.commit_shard("raw", "big", table("big", 64, 40_000))  # ~10 MB of incompressible ids
elif mode == "shard-loop":
    small = table("small", 4, 50)
    for i in range(100_000):
        run.commit_shard("raw", f"k{i:06d}", small.set_column(1, "shard_id", pa.array([f"k{i:06d}"] * 4)))
else:
    getattr(run, mode)(2, sys.argv[5])
"""


def _spawn(tmp_path, backend, mode, fault=None, *extra):
    url, options = backend
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true")
    if fault:
        env["SCALERL_STORAGE_FAULT"] = fault
    args = [sys.executable, str(script), url, json.dumps(options), mode, str(REPO), *extra]
    return subprocess.Popen(args, env=env)


def _wait_for(predicate, proc, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def _files(backend, rel):
    url, options = backend
    fs, root = fsspec.url_to_fs(f"{url}/r1/{rel}", **(options or {}))
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {k: v for k, v in found.items() if v["type"] == "file"}


def test_writer_killed_mid_shard_upload(tmp_path, cross_process_backend, make_rollouts):
    backend = cross_process_backend
    # Local disk: killed with the pages on disk but no Parquet footer yet. S3: killed after
    # the data PUT, before the commit record (a PUT itself is all-or-nothing).
    fault = "shard.data.partial" if "://" not in backend[0] else "shard.data.after"
    proc = _spawn(tmp_path, backend, "big-shard", fault)
    _wait_for(
        lambda: any(i["size"] > 5_000_000 for i in _files(backend, "shards/raw/data").values()),
        proc,
        "5 MB of the data file",
    )
    _kill(proc)
    run = open_store(backend[0], storage_options=backend[1]).run("r1")
    assert run.list_shards("raw") == [] and not run.has_shard("raw", "big")
    assert run.shard_urls("raw") == []
    with pytest.raises(ShardNotFoundError):
        run.read_shard("raw", "big")
    leftovers = _files(backend, "shards/raw/data")
    assert len(leftovers) == 1
    assert run.clean_orphans() == []  # too young: might be a live writer
    removed = run.clean_orphans(older_than_s=0)
    assert [u.rsplit("/", 1)[1] for u in removed] == [k.rsplit("/", 1)[1] for k in leftovers]
    assert _files(backend, "shards/raw/data") == {}
    table = make_rollouts("r1", "big")
    info = run.commit_shard("raw", "big", table)
    assert run.list_shards("raw") == [info]
    assert run.read_shard("raw", "big").to_pylist() == table.to_pylist()


def test_writer_killed_at_a_random_moment_never_exposes_partial_shards(
    tmp_path, cross_process_backend
):
    backend = cross_process_backend
    proc = _spawn(tmp_path, backend, "shard-loop")
    run = open_store(backend[0], storage_options=backend[1]).run("r1", create=True)
    _wait_for(lambda: len(run.list_shards("raw")) >= 3, proc, "three commits")
    _kill(proc)
    listed = run.list_shards("raw")
    for info in listed:
        assert run.read_shard("raw", info.key).num_rows == 4 == info.rows
    run.clean_orphans(older_than_s=0)
    data_files = _files(backend, "shards/raw/data")
    assert sorted(k.rsplit("/", 1)[1] for k in data_files) == sorted(
        i.url.rsplit("/", 1)[1] for i in listed
    )


@pytest.mark.parametrize("kind", ["checkpoint", "weights"])
def test_writer_killed_mid_directory_upload(tmp_path, cross_process_backend, kind):
    backend = cross_process_backend
    run = open_store(backend[0], storage_options=backend[1]).run("r1", create=True)
    save = run.save_checkpoint if kind == "checkpoint" else run.publish_weights
    for step, fill in ((1, b"a"), (2, b"b")):
        src = tmp_path / f"src{step}"
        src.mkdir()
        for name in ("model.safetensors", "optim.pt", "ledger.json"):
            (src / name).write_bytes(fill * 2000)
    save(1, tmp_path / "src1")
    mode = "save_checkpoint" if kind == "checkpoint" else "publish_weights"
    rel = "checkpoints/step-2" if kind == "checkpoint" else "weights/v2"
    proc = _spawn(tmp_path, backend, mode, f"{kind}.before_manifest", str(tmp_path / "src2"))
    _wait_for(lambda: len(_files(backend, rel)) == 3, proc, "all files of entry 2")
    _kill(proc)
    if kind == "checkpoint":
        assert run.latest_checkpoint_step() == 1 and run.list_checkpoints() == [1]
        out = run.load_checkpoint(1, tmp_path / "restore")
    else:
        assert run.latest_weights_version() == 1 and run.list_weight_versions() == [1]
        out = run.download_weights(1, tmp_path / "restore")
    assert (out / "optim.pt").read_bytes() == b"a" * 2000
    removed = run.clean_orphans(older_than_s=0)
    assert [u.rsplit("/r1/", 1)[1] for u in removed] == [rel]
    save(2, tmp_path / "src2")
    latest = run.latest_checkpoint_step() if kind == "checkpoint" else run.latest_weights_version()
    assert latest == 2
