"""A real tiny pipeline run on the S3-protocol server (tests/flows/conftest.py `real_s3_run`,
shared with the CLI tests of test_cli_real_run.py): the credentials it ran with appear nowhere:
not in run.json, shards, metrics, plots, artifacts or logs."""

import asyncio

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SECRET = "SCALERL-TEST-SECRET-9f3c1d"  # tests/flows/conftest.py SECRET: the run's secret key


def test_the_secret_appears_in_no_output(real_s3_run):
    import s3fs
    from prefect.client.orchestration import get_client

    fs = s3fs.S3FileSystem(
        key="scalerl-test-key",
        secret=SECRET,
        skip_instance_cache=True,
        client_kwargs={"endpoint_url": real_s3_run.endpoint},
    )
    root = real_s3_run.storage.removeprefix("s3://")
    files = [p for p in fs.find(root)]
    assert any(p.endswith("run.json") for p in files) and any(p.endswith(".parquet") for p in files)
    assert any(p.endswith(".png") for p in files)  # the run's plots were looked at too
    leaked = [p for p in files if SECRET.encode() in fs.cat_file(p)]
    assert not leaked, f"secret found in {leaked}"

    async def api_records():
        async with get_client() as client:
            return await client.read_artifacts(), await client.read_logs()

    artifacts, logs = asyncio.run(api_records())
    records = real_s3_run.log_records
    assert artifacts and logs and records  # the checks below looked at something
    assert not [a.key for a in artifacts if SECRET in str(a.data)]
    assert not [log.message for log in logs if SECRET in log.message]
    assert not [message for message in records if SECRET in message]
    assert SECRET not in real_s3_run.output  # what `scalerl run` printed
