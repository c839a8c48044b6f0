"""Fixtures shared across the suite: one temporary Prefect server and one S3-protocol server;
and what lets `pytest -m gpu` run on a GPU machine that has only what the GPU tests need.

`pytest -m gpu` still imports every test module to find the marked tests, and pyproject's
addopts pass --timeout, which only pytest-timeout knows. So: without pytest-timeout the
option is accepted and does nothing, and in a run that selects gpu-marked tests only, a
module (or conftest) that cannot be collected because a package is not installed is skipped
with the package named instead of aborting the collection. Every other run is unchanged.
"""

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

MOTO = Path(sys.executable).parent / "moto_server"
BUCKETS = ("scalerl-test", "scalerl-cli")
MISSING = re.compile(r"ModuleNotFoundError: (No module named '[^']+'|import of \S+ halted)")


def pytest_addoption(parser, pluginmanager):
    if pluginmanager.hasplugin("timeout"):
        return
    # addopts' --timeout without pytest-timeout (a bare GPU machine): accepted, unused
    with contextlib.suppress(ValueError):  # registered after all
        parser.addoption("--timeout", default=None, help="(pytest-timeout is not installed)")


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("timeout"):  # @pytest.mark.timeout under --strict-markers
        config.addinivalue_line("markers", "timeout(seconds): pytest-timeout's (not installed)")


def _gpu_only(config) -> bool:
    """Whether -m can select no test without the gpu mark ("gpu", "gpu and not slow"): the
    suite's markers other than gpu, in every combination, never match."""
    expr = (config.getoption("markexpr", "") or "").strip()
    if not expr:
        return False
    try:
        from _pytest.mark.expression import Expression

        compiled = Expression.compile(expr)
    except Exception:  # noqa: BLE001 - another pytest: only the plain expression
        return expr == "gpu"
    names = {m.group() for line in config.getini("markers") if (m := re.match(r"\w+", line))}
    others = sorted(names - {"gpu"})
    for bits in range(2 ** len(others)):
        if compiled.evaluate(_has({n for i, n in enumerate(others) if bits >> i & 1})):
            return False
    return True


def _has(marks: set[str]):
    """-m's matcher for an item with these marks (keyword arguments of marks: any)."""
    return lambda name, /, **kwargs: name in marks


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A GPU-only run: a module or directory whose import fails on a package that is not
    installed is skipped, naming it (module docstring)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _gpu_only(collector.config):
        found = MISSING.search(str(report.longrepr))
        if found:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"Skipped: not installed: {found.group(1)}")


# The longest modules (minutes each, tests/e2e): with `-n 2 --dist loadfile` (the Makefile's
# `make test`) xdist hands files out in collection order, so these go first and the short
# modules fill in beside them instead of one long module running alone at the end.
LONGEST_FIRST = (
    "tests/e2e/test_chaos.py",
    "tests/e2e/test_work_pools.py",
    "tests/e2e/test_ui_recovery.py",
    "tests/e2e/test_real_model_run.py",
    "tests/e2e/test_stops.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Under xdist only: the longest modules first, then every other e2e module, then the rest
    (a stable sort: the order inside a module is unchanged). A serial run keeps pytest's order."""
    # xdist's workers collect (config.workerinput) and the scheduler hands out their order
    if not hasattr(config, "workerinput") and not getattr(config.option, "numprocesses", None):
        return
    root = Path(str(config.rootpath))

    def rank(item) -> tuple[int, int]:
        rel = Path(str(item.path)).relative_to(root).as_posix()
        if rel in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(rel)
        return (1, 0) if rel.startswith("tests/e2e/") else (2, 0)

    items.sort(key=rank)


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
