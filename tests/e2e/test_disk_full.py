"""A full disk under a running run (a 20 MB tmpfs as the storage root): the CLI exits with one
`error:` line naming the storage and the fix, no process of the run is left, nothing committed
is damaged, and once there is space `scalerl resume` finishes the run and it verifies clean."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.verify import verify_run
from storage import open_store
from tests.e2e.conftest import process_group_gone

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = Path(sys.executable).parent
STEPS = 24


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _scalerl(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "SCALERL_LEASE")}
    proc = subprocess.Popen(
        [str(BIN / "scalerl"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out, err = proc.communicate(timeout=600)
    return proc, out, err


def test_a_full_disk_stops_the_run_with_one_line_and_resume_finishes_it(small_disk):
    root = small_disk / "runs"
    # 24 steps publish 24 weight versions of 1.5 MB, all kept (retention off): above 20 MB
    proc, _, err = _scalerl(
        "run", "--preset", "tiny-cpu", "--storage", str(root), "--run-id", "full",
        "--set", f"schedule.max_steps={STEPS}", "--set", "evaluation.every_steps=100",
        "--set", "data.num_eval_prompts=8", "--set", "weights.prune=false",
    )  # fmt: skip
    assert proc.returncode == 2, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]  # one line
    assert line.startswith(f"error: no space left on the storage of {root} (writing "), line
    assert line.endswith(
        "Fix: free space there or raise the quota (or move the run to a larger disk), then "
        "continue the run with `scalerl resume RUN_ID`: what was committed is intact."
    )
    assert process_group_gone(proc.pid), "processes of the run outlived it"
    run = open_store(str(root)).run("full")
    stopped_at = run.latest_weights_version()
    assert 0 < stopped_at < STEPS
    subprocess.run(["mount", "-o", "remount,size=300m", str(small_disk)], check=True)
    proc, out, err = _scalerl("resume", "full", "--storage", str(root))
    assert proc.returncode == 0, err[-3000:]
    assert f"run full: step {STEPS}" in out
    assert run.read_status()["state"] == "finished"
    report = verify_run(run)
    assert report.ok, report.problems
