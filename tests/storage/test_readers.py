"""Committed shards are plain Parquet: pyarrow, DuckDB, polars, pandas and Hugging Face datasets
read them directly from Run.shard_urls(stage), on local disk and on S3, and see the same rows the
store's verified reader returns. The snippets mirror docs/ROLLOUT_SCHEMA.md."""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from storage import open_store


@dataclass
class Shards:
    urls: list[str]
    options: dict | None  # fsspec storage_options (None on local disk)
    expected: pa.Table  # what Run.read_shard returns, all shards in commit order

    @property
    def endpoint(self) -> str:
        return self.options["client_kwargs"]["endpoint_url"]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def shards(request, tmp_path, make_rollouts) -> Shards:
    if request.param == "local":
        url, options = str(tmp_path / "runs"), None
    else:
        options = request.getfixturevalue("s3_options")
        url = f"s3://scalerl-test/{uuid.uuid4().hex[:8]}/runs"
    run = open_store(url, storage_options=options).run("rd", create=True)
    for seed, key in enumerate(["gen0-000001", "gen1-000001", "gen0-000002"]):
        table = make_rollouts("rd", key, n=6, seed=seed)
        rewards = pa.array([float(i % 2) for i in range(6)], pa.float32())
        table = table.set_column(table.schema.get_field_index("reward"), "reward", rewards)
        run.commit_shard("scored", key, table)
    expected = pa.concat_tables(run.read_shard("scored", s.key) for s in run.list_shards("scored"))
    return Shards(run.shard_urls("scored"), options, expected)


def _lengths(table: pa.Table) -> list[int]:
    return pc.list_value_length(table.column("completion_token_ids")).to_pylist()


def _check(shards: Shards, ids: list[str], rewards: list[float], lengths: list[int]) -> None:
    """Rows compared in commit order: (shard_id, group_id, sample_index) is unique."""
    assert ids == shards.expected.column("group_id").to_pylist()
    assert rewards == pytest.approx(shards.expected.column("reward").to_pylist())
    assert lengths == _lengths(shards.expected)


def _s3fs(shards: Shards):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **shards.options)


def test_pyarrow_dataset(shards):
    import pyarrow.dataset as ds

    if shards.options is None:
        dataset = ds.dataset(shards.urls, format="parquet")
    else:
        paths = [u.removeprefix("s3://") for u in shards.urls]
        dataset = ds.dataset(paths, format="parquet", filesystem=_s3fs(shards))
    table = dataset.to_table()
    _check(
        shards,
        table.column("group_id").to_pylist(),
        table.column("reward").to_pylist(),
        _lengths(table),
    )
    assert table.schema.field("started_at").type == pa.timestamp("ms", tz="UTC")


def test_duckdb(shards):
    import duckdb

    con = duckdb.connect()
    if shards.options is not None:
        con.register_filesystem(_s3fs(shards))  # no httpfs extension or secrets needed
    order = {u: i for i, u in enumerate(shards.urls)}  # back to commit order
    rows_by_file = con.execute(
        "SELECT filename, group_id, reward, len(completion_token_ids) FROM read_parquet(?, "
        "filename = true, file_row_number = true) ORDER BY file_row_number",
        [shards.urls],
    ).fetchall()
    rows = sorted(rows_by_file, key=lambda r: order[r[0]])
    _check(shards, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def test_polars(shards):
    import polars as pl

    if shards.options is None:
        df = pl.read_parquet(shards.urls)
    else:
        df = pl.read_parquet(
            shards.urls,
            storage_options={
                "aws_endpoint_url": shards.endpoint,
                "aws_access_key_id": shards.options["key"],
                "aws_secret_access_key": shards.options["secret"],
                "aws_region": "us-east-1",
                "aws_allow_http": "true",
            },
        )
    _check(
        shards,
        df["group_id"].to_list(),
        df["reward"].to_list(),
        df["completion_token_ids"].list.len().to_list(),
    )
    assert str(df.schema["started_at"].time_zone) == "UTC"


def test_pandas(shards):
    import pandas as pd

    frames = [pd.read_parquet(u, storage_options=shards.options) for u in shards.urls]
    df = pd.concat(frames, ignore_index=True)
    _check(
        shards,
        df["group_id"].tolist(),
        df["reward"].tolist(),
        [len(x) for x in df["completion_token_ids"]],
    )
    assert str(df["started_at"].dt.tz) == "UTC"


def test_hugging_face_datasets(shards, tmp_path):
    import datasets

    datasets.disable_progress_bars()
    data = datasets.load_dataset(
        "parquet",
        data_files=shards.urls,
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
        # a copy: datasets writes an "hf" entry into the dict it is given
        storage_options=copy.deepcopy(shards.options),
    )
    _check(shards, data["group_id"], data["reward"], [len(x) for x in data["completion_token_ids"]])
