"""SQL over a run's committed rollout shards with DuckDB, for local and s3:// stores alike.

    from storage import open_store
    from storage.query import RolloutQuery
    with RolloutQuery(open_store("./runs").run("my-run")) as q:
        table = q.sql("SELECT prompt_id, avg(reward) FROM rollouts GROUP BY 1")   # pyarrow.Table

Views (all read only the COMMITTED data files listed by Run.shard_urls(stage), never a
glob of data/, so a writer's half-uploaded file is never seen):

    raw, scored, filtered, eval   one view per stage of the run (empty, with the rollout
                                  columns, when a pipeline stage has no shard yet); any other
                                  stage directory of the run gets a view under its own name
    rollouts                      the most processed training stage that has shards:
                                  filtered, else scored, else raw (filtered can lag behind raw
                                  while a run is going: query raw to see everything generated)
    metrics_eval, metrics_trainer, metrics_scaling
                                  the run's metric rows, when the run has some, as
                                  Run.read_metrics gives them: one row per trainer step and
                                  per eval version (the last written; a step redone after a
                                  resume is not counted twice), sorted by it

The run's fsspec filesystem (local, s3fs with the store's endpoint and credentials, memory)
is registered with DuckDB, so no httpfs extension or CREATE SECRET is needed and s3:// URLs
work against any S3-compatible endpoint (MinIO, Ceph, R2, moto).
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa

from storage.errors import InvalidInputError
from storage.schema import ROLLOUT_SCHEMA
from storage.store import Run

PIPELINE_STAGES = ("raw", "scored", "filtered", "eval")
ROLLOUT_SOURCES = ("filtered", "scored", "raw")  # what `rollouts` points at, first with shards
METRICS = ("eval", "trainer", "scaling")


class QueryError(InvalidInputError):
    """The SQL could not be parsed, bound or run."""


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _empty_view_table(stage: str) -> pa.Table:
    schema = ROLLOUT_SCHEMA
    if stage == "filtered":
        schema = schema.append(pa.field("filter_reason", pa.string()))
    return schema.empty_table()


class RolloutQuery:
    """One DuckDB connection with a view per stage of `run` (see the module docstring).

    Shard lists are taken once, when the object is made: shards committed later are not seen
    until a new RolloutQuery is opened.
    """

    def __init__(self, run: Run, *, metrics: bool = True) -> None:
        self.run = run
        self.con = duckdb.connect()
        # The store's own filesystem object (same endpoint, credentials, timeouts); storage
        # is the package that owns it, hence the private attribute.
        loc = run._loc
        if not loc.is_local:
            self.con.register_filesystem(loc.fs)
        self.shards: dict[str, int] = {}
        stages = list(dict.fromkeys([*PIPELINE_STAGES, *run.stages()]))
        for stage in stages:
            self._stage_view(stage, stage, run.shard_urls(stage))
        source = next((s for s in ROLLOUT_SOURCES if self.shards.get(s)), "raw")
        self.rollouts_stage = source
        self.con.execute(f"CREATE VIEW rollouts AS SELECT * FROM {_ident(source)}")
        self.views = [*stages, "rollouts"]
        if metrics:
            for name in METRICS:
                table = run.read_metrics(name)
                if table.num_rows:
                    self.con.register(f"metrics_{name}", table)
                    self.views.append(f"metrics_{name}")

    def _stage_view(self, view: str, stage: str, urls: list[str]) -> None:
        self.shards[stage] = len(urls)
        if urls:
            files = "[" + ", ".join("'" + u.replace("'", "''") + "'" for u in urls) + "]"
            self.con.execute(
                f"CREATE VIEW {_ident(view)} AS SELECT * FROM read_parquet({files}, "
                "union_by_name = true)"
            )
        else:
            self.con.register(f"_empty_{view}", _empty_view_table(stage))
            self.con.execute(
                f"CREATE VIEW {_ident(view)} AS SELECT * FROM {_ident('_empty_' + view)}"
            )

    def sql(self, query: str, params: list[Any] | None = None) -> pa.Table:
        """Run one query and return its result as a pyarrow Table; QueryError when it fails."""
        if not isinstance(query, str) or not query.strip():
            raise QueryError(
                'the SQL query is empty. Fix: pass a query, e.g. "SELECT count(*) FROM rollouts".'
            )
        try:
            relation = self.con.sql(query, params=params)
            if relation is None:  # a statement without a result (SET, CREATE ...)
                return pa.table({})
            return relation.to_arrow_table()
        except duckdb.Error as e:
            first = (
                str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
            )
            raise QueryError(
                f"the SQL query failed: {first}. Fix: correct the query; views are "
                f"{', '.join(self.views)} (columns: docs/ROLLOUT_SCHEMA.md)."
            ) from None

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> RolloutQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
