"""Shard write/read throughput: Run.commit_shard / Run.read_shard against bare
pyarrow.parquet write_table / read_table (zstd) on the same filesystem, local and S3.

    .venv/bin/python bench/storage_io.py [--reps 7] [--rows 768]

The shard is realistic: 768 completions of 1k-2k tokens (int32 ids, float32 logprobs,
int32 versions) plus prompt and completion text. The S3 side starts its own moto_server on
127.0.0.1 (the bare pyarrow baseline goes through an s3fs filesystem instance). Each
measurement is repeated --reps times, store and bare interleaved (alternating which goes
first); medians are reported, and the median of per-repetition (paired) ratios. MB/s counts the table's in-memory Arrow size. Prints one
JSON object; the goal is store/plain >= 0.9 for writes and reads, local and S3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage import ROLLOUT_SCHEMA, open_store  # noqa: E402

WORDS = np.array(["the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "for", "on"])


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))


def make_shard(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1000, 2001, rows)  # completion tokens
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    versions = np.repeat(rng.integers(0, 8, rows), lengths).astype(np.int32)
    versions += (rng.random(total) < 0.1).astype(np.int32)  # some tokens from a newer policy
    lo = np.minimum.reduceat(versions, offsets[:-1])
    hi = np.maximum.reduceat(versions, offsets[:-1])
    p_len = 200
    p_offsets = np.arange(rows + 1) * p_len
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cols = {
        "run_id": ["bench"] * rows,
        "shard_id": ["gen0-000001"] * rows,
        "prompt_id": [f"p{i // 16}" for i in range(rows)],
        "group_id": [f"gen0-000001-g{i // 16}" for i in range(rows)],
        "sample_index": pa.array(np.arange(rows) % 16, pa.int32()),
        "task": ["math"] * rows,
        "prompt": [" ".join(rng.choice(WORDS, p_len)) for _ in range(rows)],
        "prompt_token_ids": _lists(p_offsets, rng.integers(0, 150_000, rows * p_len, np.int32)),
        "answer": [str(i) for i in range(rows)],
        "completion": [" ".join(rng.choice(WORDS, n)) for n in lengths],
        "completion_token_ids": _lists(offsets, rng.integers(0, 150_000, total, np.int32)),
        "logprobs": _lists(offsets, (-rng.exponential(0.5, total)).astype(np.float32)),
        "versions": _lists(offsets, versions),
        "sampled": _lists(offsets, np.ones(total, np.bool_)),
        "min_version": pa.array(lo, pa.int32()),
        "max_version": pa.array(hi, pa.int32()),
        "finish_reason": rng.choice(["stop", "length", "interrupted"], rows).tolist(),
        "thinking_tokens": pa.array(lengths * 3 // 4, pa.int32()),
        "answer_tokens": pa.array(lengths - lengths * 3 // 4, pa.int32()),
        "reward": pa.array(rng.random(rows), pa.float32()),
        "passed": pa.array(rng.random(rows) < 0.5),
        "reward_reason": ["ok"] * rows,
        "generator_id": ["gen0"] * rows,
        "started_at": pa.array([now] * rows, pa.timestamp("ms", tz="UTC")),
        "finished_at": pa.array([now] * rows, pa.timestamp("ms", tz="UTC")),
    }
    return pa.Table.from_pydict(cols, schema=ROLLOUT_SCHEMA)


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(run, plain_write, plain_read, table: pa.Table, reps: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in ("store_w", "plain_w", "store_r", "plain_r")}
    for i in range(reps):
        key = f"k{i:03d}"
        order = ("store", "plain") if i % 2 == 0 else ("plain", "store")
        for who in order:  # writes
            if who == "store":
                times["store_w"].append(_timed(run.commit_shard, "raw", key, table))
            else:
                times["plain_w"].append(_timed(plain_write, key, table))
        for who in order:  # reads
            if who == "store":
                times["store_r"].append(_timed(run.read_shard, "raw", key))
            else:
                times["plain_r"].append(_timed(plain_read, key))
    assert run.read_shard("raw", "k000").num_rows == table.num_rows == plain_read("k000").num_rows
    mb = table.nbytes / 1e6
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "write_MBps": {"store": mb / med["store_w"], "plain": mb / med["plain_w"]},
        "read_MBps": {"store": mb / med["store_r"], "plain": mb / med["plain_r"]},
        "ratio_store_over_plain": {
            "write": med["plain_w"] / med["store_w"],
            "read": med["plain_r"] / med["store_r"],
        },
        # Median of per-repetition ratios: each pair ran back to back, so it shares the
        # machine's load at that moment (robust on a busy shared host).
        "paired_ratio_median": {
            "write": statistics.median(
                p / q for p, q in zip(times["plain_w"], times["store_w"], strict=True)
            ),
            "read": statistics.median(
                p / q for p, q in zip(times["plain_r"], times["store_r"], strict=True)
            ),
        },
        "median_s": med,
    }


def bench_local(table: pa.Table, reps: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    try:
        run = open_store(str(tmp / "store")).run("bench", create=True)
        (tmp / "plain").mkdir()

        def write(key: str, t: pa.Table) -> None:
            pq.write_table(t, tmp / "plain" / f"{key}.parquet", compression="zstd")

        return measure(
            run, write, lambda key: pq.read_table(tmp / "plain" / f"{key}.parquet"), table, reps
        )
    finally:
        shutil.rmtree(tmp)


def bench_s3(table: pa.Table, reps: int) -> dict:
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint}}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.mkdir("bench")
        run = open_store("s3://bench/store", storage_options=options).run("bench", create=True)

        def write(key: str, t: pa.Table) -> None:
            pq.write_table(t, f"bench/plain/{key}.parquet", filesystem=fs, compression="zstd")

        def read(key: str) -> pa.Table:
            return pq.read_table(f"bench/plain/{key}.parquet", filesystem=fs)

        return measure(run, write, read, table, reps)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rows", type=int, default=768)
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    table = make_shard(args.rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
        },
        "shard": {
            "rows": table.num_rows,
            "completion_tokens": int(pc.sum(pc.list_value_length(table["versions"])).as_py()),
            "arrow_MB": table.nbytes / 1e6,
            "parquet_zstd_MB": sink.getvalue().size / 1e6,
        },
        "reps": args.reps,
        "local": bench_local(table, args.reps),
    }
    if not args.skip_s3:
        result["s3_moto"] = bench_s3(table, args.reps)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
