"""storage/query.py is read-only: a query sees the run's views and nothing else (no file
functions, COPY, ATTACH, INSTALL/LOAD, SET), on local disk and on the S3-protocol server; a
shard file that vanished is one clear error. Expected numbers come from reading the committed
Parquet files with pyarrow, never from the code under test."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from storage import open_store
from storage.errors import CorruptShardError
from storage.query import QueryError, ReadOnlyQueryError, RolloutQuery


@pytest.fixture
def run(cross_process_backend, make_rollouts):
    url, options = cross_process_backend
    run = open_store(url, storage_options=options).run("ro", create=True)
    for seed, key in enumerate(["gen0-000001", "gen1-000001", "gen0-000002"]):
        raw = make_rollouts("ro", key, n=6 + seed, seed=seed)
        run.commit_shard("raw", key, raw)
        scored = raw.set_column(
            raw.schema.get_field_index("reward"),
            "reward",
            pa.array([float(i % 2) for i in range(raw.num_rows)], pa.float32()),
        )
        run.commit_shard("scored", key, scored)
        reasons = pa.array([None if i % 3 else "zero_variance" for i in range(raw.num_rows)])
        run.commit_shard("filtered", key, scored.append_column("filter_reason", reasons))
    run.commit_shard("eval", "v000000-0", make_rollouts("ro", "v000000-0", n=4, seed=7))
    run.append_metrics("eval", [{"step": 0, "pass_rate": 0.25}, {"step": 2, "pass_rate": 0.5}])
    run.append_metrics("trainer", [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}])
    run.options = options
    return run


def _fs(run):
    url = run.shard_urls("raw")[0]
    fs, _ = fsspec.url_to_fs(url, **(run.options or {}))
    return fs


def _run_root(run) -> str:
    return run.shard_urls("raw")[0].split("/shards/", 1)[0]


def _snapshot(run) -> dict:
    """Every file of the run with its size and content checksum."""
    fs = _fs(run)
    root = fsspec.core.strip_protocol(_run_root(run)) if "://" in _run_root(run) else None
    root = root or _run_root(run)
    fs.invalidate_cache()
    return {p: (i["size"], fs.cat_file(p)) for p, i in fs.find(root, detail=True).items()}


def _pyarrow(run, stage) -> pa.Table:
    fs = _fs(run)
    tables = []
    for url in run.shard_urls(stage):
        with fs.open(url.split("://", 1)[-1] if "://" in url else url, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables, promote_options="permissive")


def test_every_view_gives_the_numbers_of_the_parquet_files(run):
    with RolloutQuery(run) as q:
        assert q.rollouts_stage == "filtered"
        for view in ("raw", "scored", "filtered", "eval"):
            direct = _pyarrow(run, view)
            got = q.sql(
                f"SELECT count(*) AS n, sum(len(completion_token_ids)) AS t, "
                f"sum(thinking_tokens) AS k FROM {view}"
            ).to_pylist()[0]
            assert got["n"] == direct.num_rows
            lengths = pc.list_value_length(direct.column("completion_token_ids"))
            assert got["t"] == pc.sum(lengths).as_py()
            assert got["k"] == pc.sum(direct.column("thinking_tokens")).as_py()
        filtered = _pyarrow(run, "filtered")
        rows = q.sql(
            "SELECT count(*) AS n, avg(reward) AS r FROM rollouts WHERE filter_reason IS NULL"
        )
        kept = filtered.filter(pc.is_null(filtered.column("filter_reason")))
        assert rows.column("n")[0].as_py() == kept.num_rows
        assert rows.column("r")[0].as_py() == pytest.approx(pc.mean(kept.column("reward")).as_py())
        evals = q.sql("SELECT step, pass_rate FROM metrics_eval ORDER BY step").to_pylist()
        assert evals == [{"step": 0, "pass_rate": 0.25}, {"step": 2, "pass_rate": 0.5}]
        losses = q.sql("SELECT sum(loss) AS l FROM metrics_trainer").column("l")[0].as_py()
        assert losses == pytest.approx(0.75)
        # In-memory work inside the connection is allowed: it writes nothing anywhere.
        assert q.sql("CREATE TEMP VIEW mine AS SELECT prompt_id FROM raw").num_rows == 0
        assert q.sql("SELECT count(*) AS n FROM mine").column("n")[0].as_py() == 18 + 3


def _forbidden(run, tmp_path) -> list[str]:
    root = _run_root(run)
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"a": [1]}), outside)
    shard = run.shard_urls("raw")[0]
    return [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/root/*')",
        f"SELECT * FROM glob('{tmp_path}/*')",
        f"SELECT * FROM read_parquet('{outside}')",
        f"SELECT * FROM '{outside}'",
        f"SELECT count(*) FROM read_parquet('{shard}')",  # even the run's own files: views only
        f"COPY (SELECT 1 AS x) TO '{root}/shards/raw/commits/x.json'",
        f"COPY (SELECT 9 AS x) TO '{shard}' (FORMAT parquet, USE_TMP_FILE false)",
        f"COPY raw TO '{tmp_path}/copy.csv'",
        f"EXPORT DATABASE '{tmp_path}/exported'",
        f"ATTACH '{tmp_path}/x.duckdb' AS x",
        f"ATTACH '{root}/x.duckdb' AS x",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "RESET enable_external_access",
        "SET lock_configuration = false",
        "SET allowed_directories = ['/']",
        "SET autoinstall_known_extensions = true",
        f"SET temp_directory = '{tmp_path}/spill'",
        "SET threads = 1",
        "SELECT * FROM 's3://scalerl-test/anything.parquet'",
    ]


def test_forbidden_statements_are_refused_and_the_run_is_unchanged(run, tmp_path):
    before = _snapshot(run)
    statements = _forbidden(run, tmp_path)
    local_before = sorted(p.name for p in tmp_path.iterdir())
    with RolloutQuery(run) as q:
        for sql in statements:
            with pytest.raises(ReadOnlyQueryError) as info:
                q.sql(sql)
                pytest.fail(f"not refused: {sql}")
            message = str(info.value)
            assert "\n" not in message, sql
            assert "rollouts query is read-only. Fix: query the views (" in message, message
            assert "scalerl rollouts export ro" in message and "rollouts," in message
            assert isinstance(info.value, QueryError)  # the CLI prints it as one line, exit 2
        # Still usable, still locked.
        assert q.sql("SELECT count(*) AS n FROM raw").column("n")[0].as_py() == 21
        settings = q.sql(
            "SELECT name, value FROM duckdb_settings() WHERE name IN "
            "('enable_external_access', 'lock_configuration', 'autoinstall_known_extensions', "
            "'autoload_known_extensions')"
        ).to_pylist()
        assert {s["name"]: s["value"] for s in settings} == {
            "enable_external_access": "false",
            "lock_configuration": "true",
            "autoinstall_known_extensions": "false",
            "autoload_known_extensions": "false",
        }
    assert _snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == local_before


def test_the_message_names_what_was_refused(run):
    with RolloutQuery(run) as q, pytest.raises(ReadOnlyQueryError) as info:
        q.sql("SELECT * FROM read_csv('/etc/passwd')")
    assert str(info.value).startswith(
        "the query tried to read or write outside the run's views "
        '(Cannot access file "/etc/passwd"): rollouts query is read-only. Fix: query the views '
        "(raw, scored, filtered, eval, rollouts, metrics_eval, metrics_trainer; "
        "`scalerl rollouts query ro --help` lists them), or export the run "
        "(`scalerl rollouts export ro -f parquet -o DIR`) and use DuckDB directly."
    )
    with RolloutQuery(run) as q, pytest.raises(ReadOnlyQueryError) as info:
        q.sql("SET enable_external_access = true")
    assert str(info.value).startswith(
        'the query tried to change a setting (Cannot change configuration option "'
        'enable_external_access"): rollouts query is read-only. Fix: '
    )


def _remove(run, url):
    _fs(run).rm(url.split("://", 1)[-1] if "://" in url else url)


def test_a_shard_file_deleted_before_the_query_opens(run):
    victim = run.shard_urls("scored")[1]
    _remove(run, victim)
    with pytest.raises(CorruptShardError) as info:
        RolloutQuery(run)
    message = str(info.value)
    assert message == (
        f"committed shard file {victim} is missing. Fix: run `scalerl runs verify ro` and "
        "re-run the stage that produced it (or quarantine the shard)."
    )


def test_a_shard_file_deleted_while_the_query_is_open(run):
    with RolloutQuery(run) as q:
        victim = run.shard_urls("raw")[2]
        _remove(run, victim)
        with pytest.raises(CorruptShardError) as info:
            q.sql("SELECT sum(len(completion)) FROM raw")
        assert str(info.value).startswith(f"committed shard file {victim} is missing. Fix: ")
        assert "\n" not in str(info.value)
        # Other views still answer.
        assert q.sql("SELECT count(*) AS n FROM eval").column("n")[0].as_py() == 4


def test_a_truncated_shard_file_names_the_file(run):
    victim = run.shard_urls("eval")[0]
    fs = _fs(run)
    path = victim.split("://", 1)[-1] if "://" in victim else victim
    data = fs.cat_file(path)
    fs.pipe_file(path, data[: len(data) // 2])
    with pytest.raises(CorruptShardError) as info:
        RolloutQuery(run)
    message = str(info.value)
    assert message.startswith(f"shard file {victim} cannot be read (") and "\n" not in message
    assert "scalerl runs verify ro" in message
