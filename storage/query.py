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
    metrics_eval, metrics_eval_sets, metrics_trainer, metrics_scaling, metrics_prompts
                                  the run's metric rows, when the run has some, as
                                  Run.read_metrics gives them: one row per trainer step, per
                                  eval version (the fit set's), per (evaluation set, version)
                                  with its mean@K / pass@K / maj@K columns (the last written;
                                  a step redone after a resume is not counted twice), sorted by
                                  it; the prompts kept and dropped per split

Each stage view is a lazy pyarrow.dataset over exactly those files, read through the run's own
filesystem (local disk, or the store's fsspec filesystem: s3fs with its endpoint and
credentials, memory), registered with DuckDB: DuckDB pushes column and filter selections into
it and never opens a file itself, so no httpfs extension or CREATE SECRET is needed and s3://
URLs work against any S3-compatible endpoint (MinIO, Ceph, R2, moto).

Read-only: once the views are registered the connection is locked down with DuckDB's own
settings (enable_external_access = false, autoinstall/autoload_known_extensions = false, then
lock_configuration = true), so a query sees the run's views and nothing else: no file
function (read_csv, read_parquet, glob, read_text, ...), COPY, EXPORT, ATTACH, INSTALL or
LOAD, and no SET at all (not even back). Such a query fails with a QueryError that says the
query is read-only. A committed shard file that is missing or unreadable is a
CorruptShardError naming the file.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.errors import CorruptShardError, InvalidInputError
from storage.schema import ROLLOUT_SCHEMA
from storage.store import Run

PIPELINE_STAGES = ("raw", "scored", "filtered", "eval")
ROLLOUT_SOURCES = ("filtered", "scored", "raw")  # what `rollouts` points at, first with shards
METRICS = ("eval", "eval_sets", "trainer", "scaling", "prompts")


# Applied in this order once the views exist; the last one makes every setting final.
LOCKDOWN = (
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)


class QueryError(InvalidInputError):
    """The SQL could not be parsed, bound or run."""


class ReadOnlyQueryError(QueryError):
    """The SQL tried to reach files, extensions or settings: rollouts query is read-only."""


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
        # The store's own filesystem object (same endpoint, credentials, timeouts); storage
        # is the package that owns it, hence the private attribute.
        loc = run._loc
        self._loc = loc
        self._fs = (
            pafs.LocalFileSystem()
            if loc.is_local
            else pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs))
        )
        self.con = duckdb.connect(
            config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
        )
        try:
            self._register_views(run, metrics)
            for statement in LOCKDOWN:
                self.con.execute(statement)
        except BaseException:
            self.con.close()
            raise

    def _register_views(self, run: Run, metrics: bool) -> None:
        self.shards: dict[str, int] = {}
        self._files: dict[str, str] = {}  # filesystem path -> URL, for error messages
        self._view_paths: dict[str, list[str]] = {}  # stage view -> its files' paths
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

    def _path(self, url: str) -> str:
        """The path of `url` inside the run's filesystem (a local path is its own URL)."""
        if self._loc.is_local:
            return url
        return url.split("://", 1)[1] if "://" in url else url

    def _schema(self, url: str) -> pa.Schema:
        path = self._path(url)
        fix = (
            f"Fix: run `scalerl runs verify {self.run.run_id}` and re-run the stage that "
            "produced it (or quarantine the shard)."
        )
        try:
            return pq.read_schema(path, filesystem=self._fs)
        except FileNotFoundError:
            raise CorruptShardError(f"committed shard file {url} is missing. {fix}") from None
        except (pa.ArrowException, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorruptShardError(f"shard file {url} cannot be read ({first}). {fix}") from None

    def _stage_view(self, view: str, stage: str, urls: list[str]) -> None:
        """Register `view`: a lazy dataset over exactly `urls` (columns united by name, as
        DuckDB's union_by_name; only the footers are read here, in parallel), or an empty table
        with the rollout columns."""
        self.shards[stage] = len(urls)
        if not urls:
            self.con.register(view, _empty_view_table(stage))
            return
        with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
            schemas = list(pool.map(self._schema, urls))
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        fmt = ds.ParquetFileFormat()
        paths = [self._path(u) for u in urls]
        self._files.update(zip(paths, urls, strict=True))
        self._view_paths[view] = paths
        fragments = [fmt.make_fragment(p, self._fs) for p in paths]
        self.con.register(view, ds.FileSystemDataset(fragments, schema, fmt, self._fs))

    def sql(self, query: str, params: list[Any] | None = None) -> pa.Table:
        """Run one query and return its result as a pyarrow Table; QueryError when it fails."""
        if not isinstance(query, str) or not query.strip():
            raise QueryError(
                'the SQL query is empty. Fix: pass a query, e.g. "SELECT count(*) FROM rollouts".'
            )
        self._check_files_present(query)
        try:
            relation = self.con.sql(query, params=params)
            if relation is None:  # a statement without a result (SET, CREATE ...)
                return pa.table({})
            return relation.to_arrow_table()
        except duckdb.Error as e:
            first = (
                str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
            )
            self._raise_special(e, first)
            raise QueryError(
                f"the SQL query failed: {first}. Fix: correct the query; views are "
                f"{', '.join(self.views)} (columns: docs/ROLLOUT_SCHEMA.md)."
            ) from None

    def _check_files_present(self, query: str) -> None:
        """On an object store, before a query scans: every file of the stage views the query
        names still exists (one listing per data directory). A scan that meets a deleted file
        reads it through pyarrow's PyFileSystem, whose error path can deadlock with DuckDB's
        scan threads (seen under load: the query never returned); this names the file instead.
        A local scan reports a missing file itself."""
        if self._loc.is_local or not self._files:
            return
        named = {
            self.rollouts_stage if view == "rollouts" else view
            for view in [*self._view_paths, "rollouts"]
            if re.search(rf"\b{re.escape(view)}\b", query, re.IGNORECASE)
        }
        by_dir: dict[str, list[str]] = {}
        for view in named:
            for path in self._view_paths.get(view, []):
                by_dir.setdefault(path.rsplit("/", 1)[0], []).append(path)
        fs = self._loc.fs
        for parent, paths in by_dir.items():
            fs.invalidate_cache(parent)
            present = {
                p.rstrip("/").split("://")[-1].lstrip("/") for p in fs.ls(parent, detail=False)
            }
            for path in paths:
                if path.lstrip("/") not in present:
                    raise CorruptShardError(
                        f"committed shard file {self._files[path]} is missing. Fix: run "
                        f"`scalerl runs verify {self.run.run_id}` and re-run the stage that "
                        "produced it (or quarantine the shard)."
                    )

    def _raise_special(self, error: duckdb.Error, first: str) -> None:
        """A refused file/extension/setting access or an unreadable shard file: its own error."""
        text = str(error)
        fix = (
            "rollouts query is read-only. Fix: query the views ("
            + ", ".join(self.views)
            + f"; `scalerl rollouts query {self.run.run_id} --help` lists them), or export the "
            f"run (`scalerl rollouts export {self.run.run_id} -f parquet -o DIR`) and use "
            "DuckDB directly."
        )
        detail = first.split(": ", 1)[-1].split(" - file system operations are", 1)[0]
        # "File s3://... requires the extension httpfs to be loaded": extensions stay unloaded.
        outside = "requires the extension" in text and "to be loaded" in text
        if isinstance(error, duckdb.PermissionException) or outside:
            raise ReadOnlyQueryError(
                f"the query tried to read or write outside the run's views ({detail}): {fix}"
            ) from None
        if "configuration has been locked" in text or "while database is running" in text:
            detail = detail.split(" - ", 1)[0]
            raise ReadOnlyQueryError(
                f"the query tried to change a setting ({detail}): {fix}"
            ) from None
        for path, url in self._files.items():
            if path in text:
                missing = ("No such file", "FileNotFoundError", "NoSuchKey")
                last = text.strip().splitlines()[-1].strip().rstrip(".")  # a Python cause's last
                what = (
                    "is missing"
                    if any(m in text for m in missing)
                    else f"cannot be read ({last if 'Traceback' in text else detail})"
                )
                raise CorruptShardError(
                    f"committed shard file {url} {what}. Fix: run `scalerl runs verify "
                    f"{self.run.run_id}` and re-run the stage that produced it (or quarantine "
                    "the shard)."
                ) from None

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> RolloutQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
