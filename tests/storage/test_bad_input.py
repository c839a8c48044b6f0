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


# --------------------------------------------------------------- S3 keys that may not write
RO_BUCKET = "scalerl-ro"


@pytest.fixture(scope="module")
def read_only_s3():
    """A moto_server of its own with IAM on (INITIAL_NO_AUTH_ACTION_COUNT): bucket scalerl-ro and
    an IAM user whose key may list and read it (s3:Get*, s3:List*, s3:HeadBucket) but not write.
    Yields (endpoint, key id, secret)."""
    import json
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    boto3 = pytest.importorskip("boto3")
    port = _closed_port()
    endpoint = f"http://127.0.0.1:{port}"
    # The first 4 requests are unauthenticated (the setup below); every later one is checked.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.1)
        admin = {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
        boto3.client("s3", **admin).create_bucket(Bucket=RO_BUCKET)  # 1
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")  # 2
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["s3:Get*", "s3:List*", "s3:HeadBucket"],
                    "Resource": "*",
                }
            ],
        }
        iam.put_user_policy(  # 3
            UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="reader")["AccessKey"]  # 4
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ro_fix(root: str) -> str:
    bucket, _, prefix = root.partition("/")
    return (
        f"a key allowed to read and write s3://{root}/ (s3:ListBucket on bucket {bucket}; "
        f"s3:GetObject, s3:PutObject and s3:DeleteObject on {bucket}/{prefix}/*)"
    )


@pytest.mark.integration
def test_a_read_only_key_that_writes_gets_the_url_and_the_s3_fix(read_only_s3):
    from storage import fsio
    from storage.paths import open_location

    endpoint, key, secret = read_only_s3
    options = {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": endpoint}}
    store = open_store(f"s3://{RO_BUCKET}/runs", storage_options=options)
    store.check()  # may list: the probe passes
    assert store.list_runs() == []
    loc = open_location(f"s3://{RO_BUCKET}/runs", options)
    for write in (fsio.write_atomic, fsio.create_exclusive):
        with pytest.raises(StorageCredentialsError) as e:
            write(loc, loc.join("r1", "run.json"), b"{}")
        assert str(e.value) == (
            f"access to s3://{RO_BUCKET}/runs/r1/run.json (endpoint {endpoint}) was denied "
            "(AccessDenied on put_object): this key may not write to it. Fix: use "
            f"{_ro_fix(RO_BUCKET + '/runs')}, or pick a --storage root it may write; a read-only "
            "key can list and read runs but not start or resume one."
        )
        assert secret not in str(e.value) and "chmod" not in str(e.value)
        assert e.value.__cause__ is None  # provider text (headers) stays out


@pytest.mark.integration
def test_a_read_only_key_with_run_id_through_the_cli_names_the_url(read_only_s3, tmp_path):
    """`scalerl run --run-id` with a read-only key: one line with the run's URL and the S3 fix,
    not local-disk advice (it used to say 'permission denied: Forbidden. Fix: ... chmod')."""
    from typer.testing import CliRunner

    from flows.cli import app

    endpoint, key, secret = read_only_s3
    env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_PROFILE": None}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}
    env |= {"PREFECT_API_URL": "http://127.0.0.1:9/api", "AWS_ENDPOINT_URL": None}
    args = ["run", "--preset", "tiny-cpu", "--storage", f"s3://{RO_BUCKET}/runs"]
    args += ["--set", f"storage.endpoint_url={endpoint}", "--run-id", "r1"]
    result = CliRunner().invoke(app, args, env=env)
    # S3 answers a HEAD of a key it will not show with a bare 403 (no error code): the line
    # says so and names both fixes.
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: access to s3://{RO_BUCKET}/runs/r1 (endpoint {endpoint}) was refused (HTTP 403 "
        "on head_object: the key is unknown, its secret wrong, or it lacks permission). Fix: "
        "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, or "
        f"AWS_PROFILE), and use {_ro_fix(RO_BUCKET + '/runs')}.\n"
    )


@pytest.mark.integration
def test_a_wrong_secret_is_named_as_rejected_credentials(read_only_s3):
    from storage import fsio
    from storage.paths import open_location

    endpoint, key, _ = read_only_s3
    options = {"key": key, "secret": "wrong-SECRET", "client_kwargs": {"endpoint_url": endpoint}}
    loc = open_location(f"s3://{RO_BUCKET}/runs", options)
    with pytest.raises(StorageCredentialsError) as e:
        fsio.write_atomic(loc, loc.join("x"), b"1")
    assert str(e.value) == (
        f"the credentials for s3://{RO_BUCKET}/runs/x (endpoint {endpoint}) were rejected "
        "(SignatureDoesNotMatch on put_object). Fix: check AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, or AWS_PROFILE): the key must exist at "
        "this endpoint and the secret must be its own."
    )
    store = open_store(f"s3://{RO_BUCKET}/runs", storage_options=options)
    with pytest.raises(StorageCredentialsError, match=rf"^access to s3://{RO_BUCKET}/runs \("):
        store.check()  # HeadBucket: a bare 403, named with the store's root


def _s3fs_permission_error(code: str, operation: str) -> PermissionError:
    """The exception s3fs raises for a refused request: botocore's ClientError translated by
    s3fs.errors.translate_boto_error (a PermissionError whose __cause__ is the ClientError)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    response = {"Error": {"Code": code, "Message": "Access Denied"}, "ResponseMetadata": {}}
    err = translate_boto_error(ClientError(response, operation))
    assert isinstance(err, PermissionError)
    return err


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (
            "AccessDenied",
            "access to s3://bucket/runs (endpoint http://s3.example:9000) was denied "
            "(AccessDenied): this key may not read it. Fix: use a key allowed to read and write "
            "s3://bucket/runs/ (s3:ListBucket on bucket bucket; s3:GetObject, s3:PutObject and "
            "s3:DeleteObject on bucket/runs/*), or pick a --storage root it may write; a "
            "read-only key can list and read runs but not start or resume one.",
        ),
        (
            "InvalidAccessKeyId",
            "the credentials for s3://bucket/runs (endpoint http://s3.example:9000) were "
            "rejected (InvalidAccessKeyId). Fix: check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, or AWS_PROFILE): the key must exist "
            "at this endpoint and the secret must be its own.",
        ),
        (
            "RequestTimeTooSkewed",
            "the request to s3://bucket/runs (endpoint http://s3.example:9000) was refused "
            "(RequestTimeTooSkewed). Fix: set this machine's clock right (S3 refuses requests "
            "signed more than 15 minutes off).",
        ),
    ],
)
def test_translate_names_the_root_url_and_the_s3_fix(code, expected):
    """storage.fsio._translate, the fallback for a 403 that reaches a store method from outside
    storage.paths' S3 filesystem, on the exception s3fs raises."""
    from storage.fsio import _translate
    from storage.paths import open_location

    loc = open_location(
        "s3://bucket/runs", {"client_kwargs": {"endpoint_url": "http://s3.example:9000"}}
    )
    mapped = _translate(loc, _s3fs_permission_error(code, "PutObject"))
    assert isinstance(mapped, StorageCredentialsError)
    assert str(mapped) == expected
