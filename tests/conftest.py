"""Fixtures shared across the suite: one temporary Prefect server and one S3-protocol server."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

MOTO = Path(sys.executable).parent / "moto_server"
BUCKETS = ("scalerl-test", "scalerl-cli")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3-protocol server (moto_server on 127.0.0.1) with the test buckets; its endpoint
    URL. Any key/secret is accepted. Stopped after the session."""
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    endpoint = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [str(MOTO), "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.1)
        import s3fs

        fs = s3fs.S3FileSystem(
            key="testing",
            secret="testing",
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": endpoint},
        )
        for bucket in BUCKETS:
            fs.mkdir(bucket)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
