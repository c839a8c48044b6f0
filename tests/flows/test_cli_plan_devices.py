"""`scalerl plan` and `scalerl run` under a CUDA_VISIBLE_DEVICES set on the parent (SLURM,
Kubernetes, `CUDA_VISIBLE_DEVICES=4,5 scalerl ...`): the plan shows the physical devices the run
would use, and a run whose machine shows fewer devices than placement.devices_per_node is
refused with one line before anything is written. The console script runs in a subprocess with
the variable set, as a user would run it; no GPU is needed (the list is taken as given)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "scalerl"
ON_TWO = [
    "--preset",
    "tiny-cpu",
    "--set",
    "placement.accelerator=cuda",
    "--set",
    "placement.devices_per_node=2",
]


def scalerl(*args: str, visible: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env
    )


def shown_devices(text: str) -> set[str]:
    """Every device id the rendered plan names (its warnings aside)."""
    kept = "\n".join(line for line in text.splitlines() if not line.startswith("warning:"))
    found = re.findall(r"CUDA_VISIBLE_DEVICES=([^\s,]+(?:,[^\s,]+)*)", kept)
    return {d for entry in found for d in entry.split(",")}


def test_plan_shows_only_the_devices_the_parent_was_given():
    out = scalerl("plan", *ON_TWO, visible="4,5")
    assert out.returncode == 0, out.stderr
    assert shown_devices(out.stdout) == {"4", "5"}, out.stdout
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": node" in line)
    assert "CUDA_VISIBLE_DEVICES=4," in lines["trainer@node0"]  # the trainer: local 0
    assert "CUDA_VISIBLE_DEVICES=5" in lines["gen0"] and "CUDA_VISIBLE_DEVICES=5" in lines["eval"]
    as_json = scalerl("plan", *ON_TWO, "--json", visible="4,5")
    assert as_json.returncode == 0, as_json.stderr
    plan = json.loads(as_json.stdout)
    envs = {p["name"]: p["env"]["CUDA_VISIBLE_DEVICES"] for p in plan["processes"]}
    assert envs == {"trainer@node0": "4", "gen0": "5", "eval": "5"}
    assert plan["visible"] == ["4", "5"]


def test_plan_without_the_variable_keeps_the_machines_numbering():
    out = scalerl("plan", *ON_TWO, "--json", visible=None)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    envs = {p["name"]: p["env"]["CUDA_VISIBLE_DEVICES"] for p in plan["processes"]}
    assert envs == {"trainer@node0": "0", "gen0": "1", "eval": "1"}
    assert plan["visible"] is None


def test_plan_for_more_devices_than_listed_still_plans_and_says_a_run_would_refuse():
    out = scalerl("plan", *ON_TWO, visible="4")
    assert out.returncode == 0, out.stderr
    assert shown_devices(out.stdout) == {"0", "1"}  # the configured inventory, node-local
    assert "`scalerl run` here refuses: CUDA_VISIBLE_DEVICES=4 gives this machine 1" in out.stdout


def test_run_refuses_a_machine_with_fewer_devices_before_writing(tmp_path):
    root = tmp_path / "runs"
    out = scalerl("run", *ON_TWO, "--storage", str(root), visible="4")
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: CUDA_VISIBLE_DEVICES=4 gives this machine 1 device(s), but ")
    assert "Fix: set placement.devices_per_node=1" in line
    assert not root.exists() or list(root.iterdir()) == []
