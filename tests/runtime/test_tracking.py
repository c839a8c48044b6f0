"""The tracker mirror (runtime/tracking/) over a real local run store, into the real trackers:
MLflow (a SQLite store, read back with MlflowClient), TensorBoard (event files read back with
tensorboard's EventAccumulator) and W&B in offline mode (its .wandb files read back as wandb's
own protobuf records). No network: W&B runs offline in its own directory, MLflow's dead server
is a closed loopback port."""

from __future__ import annotations

import logging
import socket
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pytest

from runtime.tracking import TrackerMirror, flat_params
from runtime.tracking.mirror import MAX_TEXT_CHARS, SAMPLE_ROWS
from storage import open_store
from tests.storage.conftest import make_rollouts_table

SECRET = "PLANTED-s3cr3t-7Q2x"


def tiny_png(shade: int) -> bytes:
    """A valid 2x2 grey PNG (zlib + CRCs written out here, no imaging library)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(b"\x00" + bytes([shade, shade]) for _ in range(2))
    ihdr = struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def loss_of(step: int) -> float:
    return 1.0 / (step + 1)  # what the test writes at `step`; read back against this formula


def pass_rate_of(version: int) -> float:
    return 0.1 + 0.05 * version


def write_steps(run, steps, *, loss=loss_of) -> None:
    for s in steps:  # one part per step, as the trainer writes them
        run.append_metrics("trainer", [{"step": s, "loss": loss(s), "samples": 128 * (s + 1)}])


def write_eval(run, version: int) -> None:
    run.append_metrics(
        "eval",
        [{"step": version, "version": version, "pass_rate": pass_rate_of(version),
          "pass_rate_se": 0.01, "compute": 128.0 * version}],
    )  # fmt: skip
    run.append_metrics(
        "eval_sets",
        [{"key": f"gsm-v{version:06d}", "set": "gsm", "step": version, "version": version,
          "pass@1": pass_rate_of(version) / 2}],
    )  # fmt: skip
    table = make_rollouts_table(run.run_id, f"v{version:06d}", n=SAMPLE_ROWS + 4)
    long = ["y" * (MAX_TEXT_CHARS * 10)] + table.column("completion").to_pylist()[1:]
    i = table.schema.get_field_index("completion")
    table = table.set_column(i, table.schema.field(i), pa.array(long, pa.string()))
    run.commit_shard("eval", f"v{version:06d}", table)


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # planted in the environment too
    run = open_store(str(tmp_path / "runs")).run("r1", create=True)
    run.write_config(
        {
            "storage": {
                "url": str(tmp_path / "runs"),
                "run_id": "r1",
                "storage_options": {"key": "AKIA", "secret": SECRET},
            },
            "model": {"name_or_path": "builtin:tiny-warm", "hf_token": SECRET},
            "data": {"source": f"https://user:{SECRET}@example.com/data.jsonl"},
            "schedule": {"max_steps": 8},
            "tracking": {},
        }  # fmt: skip
    )
    return run


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    d = tmp_path / "wandb"
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(d), "WANDB_SILENT": "true",
                 "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                 "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    return d


def test_params_are_flat_and_secrets_redacted():
    params = flat_params(
        {
            "a": {"b": 1, "c": [1, 2]},
            "storage": {"storage_options": {"secret": SECRET}, "endpoint_url": None},
            "api_key": SECRET,
            "x": {"max_new_tokens": 12, "url": f"s3://k:{SECRET}@host/b"},
            "tracking": {"mlflow": {"tracking_uri": "http://h"}},
        }
    )
    assert params["a.b"] == "1" and params["a.c"] == "[1, 2]"
    assert params["x.max_new_tokens"] == "12"  # a *_tokens count is not a token
    assert params["api_key"] == "<redacted>"
    assert params["storage.storage_options.secret"] == "<redacted>"
    assert params["x.url"] == "s3://<redacted>@host/b"
    assert not any(k.startswith("tracking") for k in params)
    assert SECRET not in repr(params)


def wandb_records(root: Path) -> list:
    """Every record of every .wandb file under `root`, parsed with wandb's own protobuf: the
    files are LevelDB-log framed (7-byte ':W&B' header, 32 KiB blocks, records of crc32,
    length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(root.rglob("*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, block, parts = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                break
            payload = data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            parts = payload if kind in (1, 2) else parts + payload
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(parts)
                records.append(record)
    return records


def wandb_history(root: Path) -> list[dict]:
    import json

    rows = []
    for r in wandb_records(root):
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in r.history.item
                }
            )
    return rows


def assert_no_secret(*roots: Path) -> None:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def test_mirror_logs_every_sink_and_resumes_without_doubles(run, tmp_path, wandb_dir):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mlflow_db = tmp_path / "mlflow" / "mlflow.db"
    mlflow_db.parent.mkdir()
    uri = f"sqlite:///{mlflow_db}"
    tracking = {
        "mlflow": {"tracking_uri": uri, "experiment": "exp"},
        "tensorboard": {"log_dir": str(tmp_path / "tb")},
        "wandb": {"project": "p", "mode": "offline", "tags": ["t1"]},
    }
    write_steps(run, range(0, 5))
    write_eval(run, 0)
    write_eval(run, 2)
    run.save_plot("curve", tiny_png(10))
    first = TrackerMirror(run, run.read_config(), tracking=tracking)
    assert first.sync() == {}
    # W&B's points are on disk once its run is finished (wandb-core buffers the run file): a
    # SIGKILL now would lose them, so the marker does not count them yet; MLflow's it does
    progress = {s["sink"]: s.get("done", {}) for s in run.read_marker("tracking")["sinks"].values()}
    assert progress["mlflow"]["trainer"][""] == 4 and not progress["wandb"].get("trainer")
    for slot in first.slots:
        first._close(slot)  # the process "dies" here: the next one resumes from the marker
    marker = run.read_marker("tracking")
    ids = {s["sink"]: s.get("id") for s in marker["sinks"].values()}
    assert (
        ids["mlflow"]
        and ids["wandb"]
        and marker["sinks"][f"mlflow {uri} experiment exp"]["done"]["trainer"][""] == 4
    )

    # the resumed run redoes step 4 (another value: the store keeps the last), goes to 7
    write_steps(run, range(4, 8), loss=lambda s: 10.0 + s)
    write_eval(run, 4)
    write_eval(run, 6)
    run.save_plot("curve", tiny_png(200))  # a new rendering is logged again
    run.write_status({"state": "finished"})
    second = TrackerMirror(run, run.read_config(), tracking=tracking)
    # stop(): the last pass (the status from the store), sinks closed; nothing left behind
    assert second.stop() == {"mlflow": 0, "tensorboard": 0, "wandb": 0}
    marker = run.read_marker("tracking")
    assert {
        s["sink"]: s.get("id") for s in marker["sinks"].values()
    } == ids  # the same tracker runs

    expected_loss = {s: loss_of(s) for s in range(0, 5)} | {s: 10.0 + s for s in range(5, 8)}

    # MLflow: one run, every step once, params without the secret, plots, tables, status
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("exp")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]
    history = client.get_metric_history(ids["mlflow"], "trainer/loss")
    assert sorted((m.step, m.value) for m in history) == sorted(expected_loss.items())
    evals = client.get_metric_history(ids["mlflow"], "eval/pass_rate")
    assert sorted((m.step, round(m.value, 9)) for m in evals) == [
        (v, round(pass_rate_of(v), 9)) for v in (0, 2, 4, 6)
    ]
    se = client.get_metric_history(ids["mlflow"], "eval/pass_rate_se")
    assert sorted(m.step for m in se) == [0, 2, 4, 6]
    sets = client.get_metric_history(ids["mlflow"], "eval_sets/gsm/pass_at_1")
    assert sorted(m.step for m in sets) == [0, 2, 4, 6]
    params = client.get_run(ids["mlflow"]).data.params
    assert params["schedule.max_steps"] == "8"
    assert params["storage.storage_options.secret"] == "<redacted>"
    assert params["model.hf_token"] == "<redacted>"
    assert "<redacted>@example.com" in params["data.source"]
    arts = {a.path for a in client.list_artifacts(ids["mlflow"], "plots")}
    assert arts == {"plots/curve.png"}
    tables = {a.path for a in client.list_artifacts(ids["mlflow"], "completions")}
    assert tables == {f"completions/v{v:06d}.json" for v in (0, 2, 4, 6)}
    finished = client.get_run(ids["mlflow"])
    assert finished.data.tags["scalerl.status"] == "finished"
    assert finished.info.status == "FINISHED"
    table_path = client.download_artifacts(ids["mlflow"], "completions/v000000.json", str(tmp_path))
    import json

    table = json.loads(Path(table_path).read_text())
    assert len(table["data"]) == SAMPLE_ROWS
    assert max(len(row[1]) for row in table["data"]) == MAX_TEXT_CHARS  # cut, with its ellipsis

    # TensorBoard: the scalars once per step (the purge drops nothing logged before the marker)
    tb_dir = tmp_path / "tb" / "r1"
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("trainer/loss")]
    assert [s for s, _ in got] == list(range(8))
    assert [pytest.approx(v) for _, v in got] == [expected_loss[s] for s in range(8)]
    assert [e.step for e in acc.Scalars("eval/pass_rate")] == [0, 2, 4, 6]
    assert len(acc.Images("plots/curve")) == 2  # two renderings

    # W&B offline: its records read back; each trainer step once over both processes
    rows = wandb_history(wandb_dir)
    steps = [r["trainer/x"] for r in rows if "trainer/x" in r]
    assert sorted(steps) == list(range(8))
    losses = {r["trainer/x"]: r["trainer/loss"] for r in rows if "trainer/x" in r}
    assert losses == pytest.approx(expected_loss)
    versions = sorted(r["eval/x"] for r in rows if "eval/x" in r)
    assert versions == [0, 2, 4, 6]
    assert [r["plots/curve/_type"] for r in rows if "plots/curve/_type" in r] == ["image-file"] * 2
    tables = [r["completions/v000006/nrows"] for r in rows if "completions/v000006/nrows" in r]
    assert tables == [SAMPLE_ROWS]  # once, though both processes saw the shard

    assert_no_secret(mlflow_db.parent, tmp_path / "tb", wandb_dir)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the block ends: nothing listens there


def test_a_dead_tracker_warns_once_and_the_others_go_on(run, tmp_path, caplog):
    tracking = {
        "mlflow": {"tracking_uri": f"http://127.0.0.1:{closed_port()}"},
        "tensorboard": {},
    }
    write_steps(run, range(3))
    mirror = TrackerMirror(run, run.read_config(), tracking=tracking)
    caplog.set_level(logging.INFO, logger="scalerl.tracking")
    mirror.sync()
    for slot in mirror.slots:
        slot.next_try = 0.0
    write_steps(run, range(3, 5))
    mirror.sync()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "mlflow failed" in warnings[0] and "Fix:" in warnings[0]
    behind = mirror.stop(status="finished")
    # 5 trainer rows the dead MLflow never took; TensorBoard (default dir: the run's own) has all
    assert behind == {"mlflow": 5, "tensorboard": 0}
    assert run.read_marker("tracking")["behind"] == behind
    assert any("5 points behind" in r.getMessage() and "runs track r1" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run.url) / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("trainer/loss")] == [0, 1, 2, 3, 4]


def test_mlflow_in_a_local_directory_takes_the_run_too(run, tmp_path, monkeypatch):
    """tracking.mlflow.tracking_uri as a plain directory (MLflow's file store, which MLflow 3
    refuses unless MLFLOW_ALLOW_FILE_STORE is set: the sink sets it)."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = tmp_path / "mlruns"
    write_steps(run, range(3))
    write_eval(run, 0)
    mirror = TrackerMirror(
        run, run.read_config(), tracking={"mlflow": {"tracking_uri": str(store)}}
    )
    assert mirror.stop(status="finished") == {"mlflow": 0}
    run_uuid = run.read_marker("tracking")["sinks"][f"mlflow {store} experiment scalerl"]["id"]
    client = MlflowClient(tracking_uri=str(store))
    history = client.get_metric_history(run_uuid, "trainer/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, loss_of(s)) for s in range(3)]
    assert client.get_run(run_uuid).data.tags["scalerl.status"] == "finished"
    assert_no_secret(store)
