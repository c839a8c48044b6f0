"""storage/query.py: DuckDB views over COMMITTED shards only, on local disk, memory:// and S3."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from storage import open_store
from storage.query import QueryError, RolloutQuery


def _scored(table: pa.Table, seed: int) -> pa.Table:
    rewards = [float((i * 7 + seed) % 3 == 0) for i in range(table.num_rows)]
    table = table.set_column(
        table.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float32())
    )
    return table.set_column(
        table.schema.get_field_index("passed"), "passed", pa.array([r > 0 for r in rewards])
    )


@pytest.fixture
def run(backend, make_rollouts):
    url, options = backend
    run = open_store(url, storage_options=options).run("q1", create=True)
    for seed, key in enumerate(["gen0-000001", "gen1-000001"]):
        raw = make_rollouts("q1", key, n=6, seed=seed)
        run.commit_shard("raw", key, raw)
        run.commit_shard("scored", key, _scored(raw, seed))
    # A dead writer's data file: in data/, but without a commit record. Never visible.
    orphan_url = run.shard_urls("raw")[0].rsplit("/", 1)[0] + "/gen9-000001.0123456789ab.parquet"
    with fsspec.open(orphan_url, "wb", **(options or {})) as f:
        pq.write_table(make_rollouts("q1", "gen9-000001", n=50, seed=9), f)
    return run


def _all(run, stage):
    return pa.concat_tables([run.read_shard(stage, s.key) for s in run.list_shards(stage)])


def test_stage_views_see_committed_rows_only(run):
    with RolloutQuery(run) as q:
        assert q.sql("SELECT count(*) AS n FROM raw").to_pylist() == [{"n": 12}]
        assert q.shards == {"raw": 2, "scored": 2, "filtered": 0, "eval": 0}
        got = q.sql("SELECT sum(len(completion_token_ids)) AS t FROM raw").column("t")[0].as_py()
    table = _all(run, "raw")
    assert got == pc.sum(pc.list_value_length(table.column("completion_token_ids"))).as_py()


def test_rollouts_is_the_most_processed_stage(run):
    with RolloutQuery(run) as q:
        assert q.rollouts_stage == "scored"
        mean = q.sql("SELECT avg(reward) AS r FROM rollouts").column("r")[0].as_py()
    assert mean == pytest.approx(pc.mean(_all(run, "scored").column("reward")).as_py())
    scored = run.read_shard("scored", "gen0-000001")
    filtered = scored.append_column("filter_reason", pa.array(["zero_variance"] * 6, pa.string()))
    run.commit_shard("filtered", "gen0-000001", filtered)
    with RolloutQuery(run) as q:  # a new query sees the new shard
        assert q.rollouts_stage == "filtered"
        rows = q.sql("SELECT filter_reason, count(*) AS n FROM rollouts GROUP BY 1").to_pylist()
    assert rows == [{"filter_reason": "zero_variance", "n": 6}]


def test_empty_stages_have_the_rollout_columns(run):
    with RolloutQuery(run) as q:
        empty = q.sql("SELECT * FROM filtered")
        assert empty.num_rows == 0
        assert (
            "filter_reason" in empty.column_names and "completion_token_ids" in empty.column_names
        )
        assert q.sql("SELECT count(*) AS n FROM eval WHERE passed").to_pylist() == [{"n": 0}]


def test_other_stages_and_metrics_get_views(run):
    run.commit_shard("rescored-v2", "gen0-000001", run.read_shard("scored", "gen0-000001"))
    run.append_metrics("eval", [{"step": 0, "pass_rate": 0.25}, {"step": 5, "pass_rate": 0.5}])
    with RolloutQuery(run) as q:
        assert "rescored-v2" in q.views and "metrics_eval" in q.views
        assert "metrics_trainer" not in q.views  # no rows yet
        assert q.sql('SELECT count(*) AS n FROM "rescored-v2"').to_pylist() == [{"n": 6}]
        rates = q.sql("SELECT pass_rate FROM metrics_eval ORDER BY step").column("pass_rate")
        assert rates.to_pylist() == [0.25, 0.5]


def test_parameters_are_bound(run):
    with RolloutQuery(run) as q:
        n = q.sql("SELECT count(*) AS n FROM raw WHERE prompt_id = ?", ["p1"]).to_pylist()
    table = _all(run, "raw")
    assert n == [{"n": pc.sum(pc.equal(table.column("prompt_id"), "p1")).as_py()}]


@pytest.mark.parametrize(
    "sql, needle",
    [
        ("SELEC 1", "syntax error"),
        ("SELECT nope FROM raw", "nope"),
        ("SELECT * FROM nowhere", "nowhere"),
        ("   ", "empty"),
    ],
)
def test_bad_sql_is_one_clear_error(run, sql, needle):
    with RolloutQuery(run) as q, pytest.raises(QueryError) as info:
        q.sql(sql)
    message = str(info.value)
    assert needle in message and "Fix:" in message and "\n" not in message
    assert "rollouts" in message


def test_statements_without_results_return_an_empty_table(run):
    with RolloutQuery(run) as q:
        assert q.sql("CREATE TEMP VIEW r2 AS SELECT * FROM raw").num_rows == 0
        # SET is refused: the configuration is locked (tests/storage/test_query_readonly.py).
        with pytest.raises(QueryError, match="read-only"):
            q.sql("SET threads = 1")
