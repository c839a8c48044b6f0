"""A prune killed between a version's manifest and its files leaves a manifest-less weights/vN
folder; the next prune removes it (storage/dirs.py remove_unpublished, below the version it
deletes), and never touches an entry a publish is writing right now (above the newest
committed). Real processes killed with SIGKILL at the store's fault points, a real local store,
the real retention plan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runtime.retention import apply_plan, prune_plan
from scalerl.config import load_config
from storage import open_store
from storage.dirs import MANIFEST

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys
from pathlib import Path
from storage import open_store
run = open_store(sys.argv[1]).run("r")
if sys.argv[2] == "delete":
    run.delete_weights(int(sys.argv[3]))
else:
    run.publish_weights(int(sys.argv[3]), Path(sys.argv[4]))
"""


def _version_dir(tmp: Path, v: int) -> Path:
    d = tmp / "src" / f"v{v}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes([v]) * 1000)
    (d / "config.json").write_text("{}")
    return d


def _child(store: Path, fault: str, *args: str, sleep: str = "300") -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SCALERL_STORAGE_FAULT": fault,
        "SCALERL_STORAGE_FAULT_SLEEP": sleep,
    }
    return subprocess.Popen([sys.executable, "-c", CHILD, str(store), *args], env=env)


def _wait(cond, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_prune_killed_midway_leaves_a_folder_the_next_prune_removes(tmp_path):
    store = tmp_path / "store"
    run = open_store(str(store)).run("r", create=True)
    for v in range(10):
        run.publish_weights(v, _version_dir(tmp_path, v))
    weights = store / "r" / "weights"
    # a prune of v1 killed after its manifest went, before its files did
    killed = _child(store, "weights.prune_after_manifest", "delete", "1")
    _wait(lambda: not (weights / "v1" / MANIFEST).exists(), "v1's manifest to go")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert (weights / "v1" / "model.safetensors").exists()  # the leftover, invisible
    assert 1 not in run.list_weight_versions()
    # a publish of v10 in flight: its files are there, its manifest not yet
    publishing = _child(
        store, "weights.before_manifest", "publish", "10", str(_version_dir(tmp_path, 10)),
        sleep="4",
    )  # fmt: skip
    _wait(lambda: (weights / "v10" / "model.safetensors").exists(), "v10's files")
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={store}",
            "pipeline.max_off_policy_steps=2",
            "evaluation.every_steps=4",
        ],
    )
    plan = prune_plan(run, cfg, running=True)
    # newest 9; kept: 0 (base), 9 - 2 - 1 = 6 and above (staleness window), 4 and 8 (evaluation)
    assert plan.weights == [2, 3, 5]
    apply_plan(run, plan, by="test")
    assert not (weights / "v1").exists()  # the killed prune's leftover is gone
    assert (weights / "v10" / "model.safetensors").exists()  # the publish in flight is not
    assert publishing.wait(timeout=60) == 0
    assert run.list_weight_versions() == [0, 4, 6, 7, 8, 9, 10]
    assert sorted(p.name for p in weights.iterdir() if p.is_dir()) == [
        f"v{v}" for v in (0, 10, 4, 6, 7, 8, 9)
    ]
