"""bench/gpu_smoke.py, the check for a lent GPU without vLLM or Prefect, and the part runner it
shares with bench/gpu_suite.py.

- `gpu_smoke.py --cpu` passes with prefect, vllm, duckdb, s3fs, datasets and math_verify made
  unimportable (as on the device image, where they are absent), and its numbers agree with
  formulas written here (slow: about 2 minutes on 2 cores).
- A part past its time limit is killed with every process it started (an evaluation child
  that kept GPU memory into the next part was the defect), and one that ends leaves none.
- An evaluation child (runtime/eval_child.py) exits when the process that started it is gone.
- Time limits fit the budget: a part the budget cannot hold is skipped, not timed out, and
  gpu_suite's two pipeline runs get equal time (so k8/k0 can be reported).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCKER = '''
import sys

BLOCKED = {blocked!r}


class Blocker:
    """Imports of the blocked packages fail as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
        return None


sys.meta_path.insert(0, Blocker())
'''


def _load(name: str):
    sys.path.insert(0, str(REPO / "bench"))  # gpu_suite imports gpu_smoke as a sibling
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smoke = _load("gpu_smoke")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed, its parent gone, not yet reaped by init) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# A part that starts a grandchild (as a pipeline part starts an evaluation child) which would
# run for a minute, writes its pid, then sleeps for `sys.argv[2]` seconds.
PART = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(float(sys.argv[2]))
"""


def test_a_part_past_its_limit_is_killed_with_the_processes_it_started(tmp_path):
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(smoke.PartTimeout, match="killed after 4 s"):
        smoke.run_limited([sys.executable, "-c", PART, str(pid_file), "60"], 4.0)
    assert time.monotonic() - t0 < 15
    assert _gone(int(pid_file.read_text()))


def test_a_part_that_ends_leaves_no_process_behind(tmp_path):
    pid_file = tmp_path / "pid"
    smoke.run_limited([sys.executable, "-c", PART, str(pid_file), "0"], 30.0)
    assert _gone(int(pid_file.read_text()))


def test_a_failing_part_reports_its_exit_and_stderr():
    with pytest.raises(smoke.PartFailed, match=r"exit 3: .*the reason"):
        smoke.run_limited(
            [sys.executable, "-c", "import sys; print('the reason', file=sys.stderr); sys.exit(3)"],
            30,
        )
    with pytest.raises(smoke.PartFailed, match="the reason"):
        smoke.run_limited([sys.executable, "-c", "raise SystemExit('the reason')"], 30)


# The evaluation child's parent starts it and dies (SIGKILLed with a run, or killed alone):
# stdin stays open (the test holds the pipe), so only the child's parent watchdog can end it.
MIDDLE = r"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-m", "runtime.eval_child", "r1", "1"],
                         stdin=int(sys.argv[1]), pass_fds=(int(sys.argv[1]),),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
# die once the child runs a second thread (its watchdog, which has read our pid by then)
deadline = time.monotonic() + 30
while len(os.listdir(f"/proc/{child.pid}/task")) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
print(child.pid, flush=True)
"""


def test_an_evaluation_child_exits_when_its_parent_is_gone():
    read, write = os.pipe()
    try:
        out = subprocess.run(
            [sys.executable, "-c", MIDDLE, str(read)],
            cwd=REPO, pass_fds=(read,), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        child = int(out.stdout.split()[0])
        assert _gone(child, within_s=30.0)  # the watchdog polls every second; imports first
    finally:
        os.close(write)
        os.close(read)


class Clock:
    """A clock that each part advances by the seconds it 'takes'."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_limits_fit_the_budget_and_a_part_without_time_is_skipped():
    clock, limits = Clock(), {}

    def part(name: str, takes: float | None, error: Exception | None = None):
        def run(limit: float) -> dict:
            limits[name] = limit
            clock.now += limit if takes is None else takes
            if error:
                raise error
            return {"value": 1}

        return run

    parts = [
        ("a", 200.0, part("a", 10.0)),
        ("b", 200.0, part("b", None, smoke.PartTimeout("killed"))),  # uses all its time
        ("c", 200.0, part("c", 5.0, ValueError("bad"))),
        ("d", 200.0, part("d", 1.0)),
    ]
    # caps add to 800 against a 400 s budget: each is scaled to 100 s, and what the first
    # parts leave unused does not starve the later ones
    got = smoke.run_parts(parts, 400.0, clock=clock)
    assert limits == {"a": 100.0, "b": 100.0, "c": 100.0, "d": 100.0}
    assert [got[k]["status"] for k in "abcd"] == ["ok", "timeout", "failed", "ok"]
    assert got["a"] == {"status": "ok", "value": 1, "seconds": 10.0}
    assert got["c"]["error"] == "ValueError: bad"
    # a part that ran past its limit (a slow kill) left too little: the next is skipped,
    # saying why, and never run
    clock.now, limits = 0.0, {}
    parts[0] = ("a", 200.0, part("a", 395.0))
    got = smoke.run_parts(parts[:1] + parts[3:], 400.0, clock=clock)
    assert got["d"]["status"] == "skipped" and "5 s of the 400 s budget left" in got["d"]["reason"]
    assert "d" not in limits


def test_the_scripts_caps_add_up_to_their_budgets():
    for column, mode in enumerate(("gpu", "cpu")):
        assert sum(cap[column] for cap in smoke.CAPS.values()) <= smoke.BUDGET_S[mode]
    suite = _load("gpu_suite")
    # the default budget less the model build (~15 s) holds every part at its full cap, and
    # the two pipeline runs get the same time
    assert sum(suite.CAPS.values()) <= 600 - 15
    assert suite.CAPS["pipeline_k8"] == suite.CAPS["pipeline_k0"]


@pytest.mark.slow
def test_cpu_smoke_passes_without_prefect_vllm_and_the_store_packages(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(smoke.BLOCKED)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    out = tmp_path / "smoke.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "bench/gpu_smoke.py", "--cpu", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert elapsed < 180
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert {k: p["status"] for k, p in parts.items()} == {k: "ok" for k in smoke.PARTS}
    assert all(parts["environment"]["absent"].values())  # the blocker held in the parts

    tests = parts["gpu_tests"]  # collected without the blocked packages; skipped without CUDA
    assert "tests/scalerl/trainer/test_cuda.py" in tests["files"]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0

    head = parts["fp32_head"]  # errors against float64: float32 rounding vs bf16's 8-bit mantissa
    assert head["fp32"]["max_abs_err_vs_float64"] < 1e-4
    assert head["bf16"]["mean_abs_err_vs_float64"] > 1e-3
    assert head["bf16"]["mean_abs_err_vs_float64"] > 100 * head["fp32"]["mean_abs_err_vs_float64"]

    trainer = parts["trainer"]  # token counts from the batch itself; rates from the step times
    ts = _load("trainer_step")
    size = smoke.SIZES["cpu"]["trainer"]
    table = ts.build_batch(size["prompts"], size["samples"], size["prompt_len"],
                           size["completion_len"], ts.SHAPES[size["shape"]]["vocab_size"])  # fmt: skip
    completions = [len(c) for c in table.column("completion_token_ids").to_pylist()]
    prompts = [len(p) for p in table.column("prompt_token_ids").to_pylist()]
    assert trainer["completion_tokens"] == sum(completions)
    assert trainer["sequence_tokens"] == sum(completions) + sum(prompts)
    for variant in ("bare", "ours", "ours_checkpointing"):
        got = trainer[variant]
        rate = trainer["completion_tokens"] / got["median_step_s"]
        assert got["tokens_per_s"] == pytest.approx(rate, rel=1e-2)
        assert got["mfu"] is None and got["peak_memory_gib"] is None  # no GPU peak on a CPU
    bare = trainer["bare"]["median_step_s"]
    assert trainer["ours"]["ratio_to_bare"] == pytest.approx(
        bare / trainer["ours"]["median_step_s"], rel=1e-2
    )

    fsdp = parts["fsdp_dcp"]
    assert fsdp["backend"] == "gloo" and fsdp["rng_restored"]
    assert fsdp["losses_fsdp"] == pytest.approx(fsdp["losses_single"], rel=1e-4)
    assert fsdp["max_abs_weight_move_in_3_steps"] > 0  # the steps trained
    assert (
        fsdp["max_abs_weight_diff_after_3_steps"] <= 1e-3 * fsdp["max_abs_weight_move_in_3_steps"]
    )
    assert fsdp["step4_loss_resumed"] == pytest.approx(fsdp["step4_loss"], rel=1e-6)

    engine, size = parts["hf_engine"], smoke.SIZES["cpu"]["engine"]
    n_seq = size["prompts"] * size["samples"]
    assert engine["speed"]["tokens"] == n_seq * size["tokens"]  # ignore_eos: every token made
    update = engine["in_flight_update"]
    assert update["completions"] == n_seq and update["completions_spanning_v0_v1"] == n_seq
    assert update["load_weights_s"] > 0
    assert engine["log_ratio"]["tokens"] == n_seq * size["tokens"]
    assert 0 <= engine["log_ratio"]["mean_abs"] < 0.1
