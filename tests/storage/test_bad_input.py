"""Bad names, URLs and endpoints: one clear error each, naming the thing and the fix."""

from __future__ import annotations

import os
import socket
import time

import pytest

from storage import open_store
from storage.errors import (
    BucketNotFoundError,
    InvalidRunIdError,
    InvalidStorageUrlError,
    StorageCredentialsError,
    StorageUnreachableError,
)

BAD_NAMES = ["", "a/b", "..", "../etc", ".hidden", "a b", "a\\b", "x" * 129, "é", "a\nb", "a:b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_run_ids_are_refused(tmp_path, name):
    store = open_store(str(tmp_path))
    with pytest.raises(InvalidRunIdError, match="Fix: ") as e:
        store.run(name, create=True)
    assert "run id" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing was created, inside or outside the root


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_stage_and_key_names_are_refused(tmp_path, name, make_rollouts):
    run = open_store(str(tmp_path)).run("r1", create=True)
    table = make_rollouts("r1", "k")
    with pytest.raises(InvalidRunIdError, match="stage name .*Fix: "):
        run.commit_shard(name, "k", table)
    with pytest.raises(InvalidRunIdError, match="shard key .*Fix: "):
        run.commit_shard("raw", name, table)
    with pytest.raises(InvalidRunIdError, match="metrics name"):
        run.append_metrics(name, [{"a": 1}])
    with pytest.raises(InvalidRunIdError, match="split name"):
        run.read_prompts(name)
    assert run.stages() == []


def test_longest_valid_name_is_accepted(tmp_path):
    name = "a" * 128
    assert open_store(str(tmp_path)).run(name, create=True).run_id == name


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://x/y", "unsupported scheme 'ftp://'"),
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("s3://Bad_Bucket/x", "not a valid bucket name"),
        ("s3://bucket/a/../b", "'..'"),
        ("", "is empty"),
    ],
)
def test_bad_urls(url, expected):
    with pytest.raises(InvalidStorageUrlError, match="Fix: ") as e:
        open_store(url)
    assert expected in str(e.value)


def test_local_url_forms_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open_store("./runs").run("r1", create=True)
    assert open_store(f"file://{tmp_path}/runs").list_runs() == ["r1"]
    assert open_store(str(tmp_path / "runs")).url == str(tmp_path / "runs")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_unreachable_endpoint_fails_fast_and_names_it():
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    options = {"key": "AKIDSECRETKEYID", "secret": "s3cr3t-do-not-print"}
    options["client_kwargs"] = {"endpoint_url": endpoint}
    store = open_store("s3://bucket/runs", storage_options=options)
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError, match="Fix: check the endpoint URL") as e:
        store.check()
    assert time.monotonic() - start < 10
    assert endpoint in str(e.value)
    assert "s3cr3t" not in str(e.value) and e.value.__cause__ is None
    with pytest.raises(StorageUnreachableError):
        store.run("r1", create=True)


@pytest.mark.integration
def test_missing_credentials_are_named_without_secrets(s3_options, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    options = {"client_kwargs": s3_options["client_kwargs"]}
    store = open_store("s3://scalerl-test/runs", storage_options=options)
    with pytest.raises(StorageCredentialsError, match="AWS_ACCESS_KEY_ID.*Fix: |Fix: .*AWS_"):
        store.check()


@pytest.mark.integration
def test_missing_bucket(s3_options):
    store = open_store("s3://no-such-bucket/runs", storage_options=s3_options)
    with pytest.raises(
        BucketNotFoundError, match="'no-such-bucket' does not exist at .*Fix: create"
    ):
        store.check()
