"""Fixtures for the CLI tests, on local disk and on a real S3-protocol server (moto_server on
loopback):

- `real_run`: a REAL short tiny-cpu pipeline run (`scalerl run --preset tiny-cpu ...` under the
  session's Prefect test server), one per backend, made once per session (about 25 s each);
- `demo`: a finished-looking run built with the storage API alone (no model, no Prefect) whose
  numbers are known in advance (see below), for checks a real run cannot make (the fit
  recovering a known sigmoid, hand-made edge cases).

The run `demo` holds, for the tiny-cpu config snapshot:
- raw / scored / filtered shards of two generators (keys gen0-000001, gen0-000002, gen1-000001),
  2 prompts x 4 samples each, some completions spanning two policy versions;
- eval shards v000000..v000007 and `eval` metrics rows whose pass rate follows the sigmoid
  R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) with the constants below;
- `trainer` metrics rows with staleness/{d} histograms, as scalerl/trainer/loop.py writes them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pytest

from scalerl.config import RunConfig, load_config
from storage import open_store, rollouts_from_records

RUN_ID = "demo"
TRUE_A, TRUE_B, TRUE_C_MID, TRUE_R0 = 0.6, 1.5, 1000.0, 0.1
EVAL_VERSIONS = range(8)
COMPUTE_PER_VERSION = 500.0
RAW_KEYS = ("gen0-000001", "gen0-000002", "gen1-000001")
K = 8


def true_pass_rate(C: float) -> float:
    if C == 0:
        return TRUE_R0
    return TRUE_R0 + (TRUE_A - TRUE_R0) / (1.0 + (TRUE_C_MID / C) ** TRUE_B)


@dataclass
class DemoRun:
    storage: str
    endpoint: str | None
    run_id: str = RUN_ID
    records: dict[str, list[dict]] = field(default_factory=dict)
    eval_rows: list[dict] = field(default_factory=list)
    trainer_rows: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    truth: dict = field(
        default_factory=lambda: {"A": TRUE_A, "B": TRUE_B, "C_mid": TRUE_C_MID, "R0": TRUE_R0}
    )
    """The sigmoid the eval metrics rows follow."""

    @property
    def args(self) -> list[str]:
        return ["--storage", self.storage] + (
            ["--endpoint-url", self.endpoint] if self.endpoint else []
        )


def _completion(shard: str, i: int, version: int, passed: bool) -> dict:
    """One completion; every third spans two versions, lengths and finish reasons vary."""
    length = 6 + (7 * i + 3 * len(shard)) % 40
    spans = i % 3 == 0
    versions = [version] * (length // 2) + [version + spans] * (length - length // 2)
    finish = "interrupted" if length > 30 else "length" if i % 7 == 6 else "stop"
    thinking = min(length - 2, 28) if finish == "interrupted" else length - 3
    t0 = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC) + dt.timedelta(minutes=version)
    return {
        "completion": f"<think>step {i} of {shard}</think> The answer is {i if passed else -1}.",
        "completion_token_ids": [(11 * i + j) % 500 for j in range(length)],
        "logprobs": [-0.1 * ((i + j) % 5) for j in range(length)],
        "versions": versions,
        "finish_reason": finish,
        "thinking_tokens": thinking,
        "answer_tokens": length - thinking,
        "reward": 1.0 if passed else 0.0,
        "passed": passed,
        "reward_reason": "correct" if passed else "wrong",
        "started_at": t0,
        "finished_at": t0 + dt.timedelta(seconds=i + 1),
    }


def _group_records(shard: str, generator: str, version: int, prompts: int, pass_of) -> list[dict]:
    records = []
    for p in range(prompts):
        pid = f"p{(version * prompts + p) % 11:03d}"
        for s in range(4):
            i = p * 4 + s
            records.append(
                {
                    "run_id": RUN_ID,
                    "shard_id": shard,
                    "prompt_id": pid,
                    "group_id": f"{shard}-g{p}",
                    "sample_index": s,
                    "task": "arith",
                    "prompt": f"What is {p} + {version}? Put [the answer] last.",
                    "prompt_token_ids": [1, 2, 3 + p],
                    "answer": str(p + version),
                    "generator_id": generator,
                    **_completion(shard, i, version, pass_of(p, s)),
                }
            )
    return records


def _unscored(record: dict) -> dict:
    return record | {"reward": None, "passed": None, "reward_reason": None}


def build_demo_run(storage: str, options: dict | None, endpoint: str | None) -> DemoRun:
    run = open_store(storage, storage_options=options).run(RUN_ID, create=True)
    demo = DemoRun(storage=storage, endpoint=endpoint)
    demo.config = load_config(preset="tiny-cpu").model_dump(mode="json")
    run.write_config(demo.config)
    scored_all, filtered_all, raw_all, eval_all = [], [], [], []
    for n, key in enumerate(RAW_KEYS):
        generator = key.split("-")[0]
        # prompt 0 of each shard: mixed rewards; prompt 1: all wrong (a zero-variance group)
        scored = _group_records(key, generator, n + 1, 2, lambda p, s: p == 0 and s % 2 == 0)
        raw = [_unscored(r) for r in scored]
        run.commit_shard("raw", key, rollouts_from_records(raw))
        run.commit_shard("scored", key, rollouts_from_records(scored))
        reasons = [None if r["group_id"].endswith("g0") else "zero_variance" for r in scored]
        filtered = rollouts_from_records(scored).append_column(
            "filter_reason", pa.array(reasons, pa.string())
        )
        run.commit_shard("filtered", key, filtered)
        raw_all += raw
        scored_all += scored
        filtered_all += [r | {"filter_reason": f} for r, f in zip(scored, reasons, strict=True)]
    for v in EVAL_VERSIONS:
        compute = v * COMPUTE_PER_VERSION
        rate = true_pass_rate(compute)
        shard = f"eval-v{v:06d}"
        records = _group_records(shard, "eval", v, 2, lambda p, s, v=v: (p * 4 + s + v) % 8 < 3)
        for r in records:  # eval completions come from exactly one version
            r["versions"] = [v] * len(r["versions"])
        run.commit_shard("eval", f"v{v:06d}", rollouts_from_records(records))
        eval_all += records
        demo.eval_rows.append(
            {
                "step": v,
                "version": v,
                "compute": compute,
                "pass_rate": rate,
                "prompts": 2,
                "samples": len(records),
                "mean_length": sum(len(r["completion_token_ids"]) for r in records) / 8,
                "truncation_rate": 0.0,
                "interruption_rate": 0.25,
            }
        )
    run.append_metrics("eval", demo.eval_rows)
    for step in range(1, 6):
        row = {
            "step": step,
            "trained_version": step - 1,
            "time": 1.7e9 + step,
            "loss": 0.5 / step,
            "pass_rate": 0.2 + 0.02 * step,
            "truncation_rate": 0.0,
            "interruption_rate": 0.1,
            **{f"staleness/{d}": (16 if d == 0 else 8 if d == 1 else 4 if d == step else 0)
               for d in range(K + 1)},
        }  # fmt: skip
        demo.trainer_rows.append(row)
    run.append_metrics("trainer", demo.trainer_rows)
    demo.records = {
        "raw": raw_all,
        "scored": scored_all,
        "filtered": filtered_all,
        "eval": eval_all,
    }
    return demo


@pytest.fixture(scope="session")
def local_demo(tmp_path_factory) -> DemoRun:
    return build_demo_run(str(tmp_path_factory.mktemp("store") / "runs"), None, None)


@pytest.fixture(scope="session")
def s3_demo(moto_endpoint) -> DemoRun:
    url = f"s3://scalerl-cli/{uuid.uuid4().hex[:8]}/runs"
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": moto_endpoint},
    }
    return build_demo_run(url, options, moto_endpoint)


@pytest.fixture
def s3_credentials(monkeypatch):
    """The CLI gets S3 credentials the way users give them: AWS_* variables."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def demo(request) -> DemoRun:
    """The demo run on each backend (read-only: tests never write into it)."""
    if request.param == "local":
        return request.getfixturevalue("local_demo")
    request.getfixturevalue("s3_credentials")
    return request.getfixturevalue("s3_demo")


@pytest.fixture
def make_demo_run():
    """build_demo_run(storage, storage_options, endpoint) for tests that damage their run."""
    return build_demo_run


# -- real pipeline runs -----------------------------------------------------------------------

REAL_RUN_ID = "real-tiny"
# Short, but with enough evaluations for the sigmoid fit (version 0 plus MIN_POINTS = 4 more):
# every trainer step is evaluated on 8 held-out prompts x 2 samples.
REAL_OVERRIDES = (
    "schedule.max_steps=6",
    "evaluation.every_steps=1",
    "data.num_eval_prompts=8",
    "evaluation.samples_per_prompt=2",
)
SECRET = "SCALERL-TEST-SECRET-9f3c1d"  # recognizable; moto accepts any credentials
S3_TEST_KEY = "testing"


@dataclass
class RealRun:
    """A finished tiny-cpu pipeline run and how to reach it."""

    kind: str  # "local" | "s3"
    storage: str
    endpoint: str | None
    run_id: str
    output: str
    """What `scalerl run` printed."""
    log_records: list[str]
    """Every log message emitted in this process while the run ran."""

    @property
    def args(self) -> list[str]:
        return ["--storage", self.storage] + (
            ["--endpoint-url", self.endpoint] if self.endpoint else []
        )

    @property
    def storage_options(self) -> dict | None:
        if self.endpoint is None:
            return None
        return {
            "key": S3_TEST_KEY,
            "secret": S3_TEST_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

    def open(self):
        return open_store(self.storage, storage_options=self.storage_options).run(self.run_id)

    def config(self) -> RunConfig:
        return RunConfig.model_validate(self.open().read_config())

    def fs(self):
        """(a fresh fsspec filesystem, the root path) of the store, with no listing cache."""
        import fsspec

        if self.endpoint is None:
            return fsspec.filesystem("file"), self.storage
        import s3fs

        fs = s3fs.S3FileSystem(
            key=S3_TEST_KEY,
            secret=S3_TEST_KEY,
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.endpoint},
        )
        return fs, self.storage.removeprefix("s3://")

    def listing(self) -> dict[str, tuple]:
        """Every object under the store root with its size and modification stamp: compare two
        listings to show that nothing was written."""
        fs, root = self.fs()
        fs.invalidate_cache()
        found = fs.find(root, detail=True) if fs.exists(root) else {}
        return {
            path: (info["size"], info.get("mtime") or info.get("LastModified"), info.get("ETag"))
            for path, info in found.items()
        }


def _run_pipeline(kind: str, storage: str, endpoint: str | None) -> RealRun:
    """`scalerl run --preset tiny-cpu` through the real CLI entry point, in this process so that
    it reports to the session's Prefect test server; its stdout and every log message captured.
    (Not CliRunner: Prefect's log handlers would keep CliRunner's stderr after it is closed.)"""
    import contextlib
    import io
    import logging

    import flows.run  # noqa: F401 - sets up Prefect's logging (dictConfig drops handlers): first
    from flows.cli import app

    args = ["run", "--preset", "tiny-cpu", "--storage", storage, "--run-id", REAL_RUN_ID]
    args += [a for o in REAL_OVERRIDES for a in ("--set", o)]
    if endpoint:
        args += ["--set", f"storage.endpoint_url={endpoint}"]
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    for logger in loggers:
        logger.addHandler(handler)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = app(args, prog_name="scalerl", standalone_mode=False)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not code, (code, out.getvalue())
    return RealRun(kind, storage, endpoint, REAL_RUN_ID, out.getvalue(), records)


@pytest.fixture(scope="session")
def real_local_run(prefect_harness, tmp_path_factory) -> RealRun:
    # A root no earlier session used: Prefect's task cache (kept in ~/.prefect across sessions)
    # is keyed by store URL, run id and shard, so a reused root would skip the stage tasks.
    root = tmp_path_factory.mktemp("real") / uuid.uuid4().hex[:8] / "runs"
    return _run_pipeline("local", str(root), None)


@pytest.fixture(scope="session")
def real_s3_run(prefect_harness, moto_endpoint) -> RealRun:
    """The S3 run is made with a recognizable secret key (tests/flows/test_s3_pipeline.py checks
    that it leaks nowhere); tests then read it with other credentials (moto accepts any)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "scalerl-test-key")
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    try:
        url = f"s3://scalerl-cli/{uuid.uuid4().hex[:8]}/runs"
        return _run_pipeline("s3", url, moto_endpoint)
    finally:
        mp.undo()


@pytest.fixture(
    params=[
        pytest.param("local", marks=pytest.mark.slow),
        pytest.param("s3", marks=[pytest.mark.slow, pytest.mark.integration]),
    ]
)
def real_run(request) -> RealRun:
    """The real run on each backend (read-only: tests that write copy it first). S3 commands get
    credentials the way users give them: AWS_* variables."""
    if request.param == "local":
        return request.getfixturevalue("real_local_run")
    request.getfixturevalue("s3_credentials")
    return request.getfixturevalue("real_s3_run")
