"""With vLLM, evaluation runs in its own process: the generator's engine lives in the flow's
process and vLLM allows one engine per process. Here a parent process holds a live VLLMEngine
(as a generator does) and evaluates a published version through tasks.evaluate; the eval shard
is committed, scored, and the parent's engine still generates afterwards."""

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = r"""
import sys
import pyarrow as pa
from scalerl.config import load_config
from scalerl.engines.base import GroupRequest, SamplingSettings
from scalerl.engines.vllm_engine import VLLMEngine
from scalerl.models import build_tiny_model
from storage import PROMPT_SCHEMA, open_store
from runtime.evaluation import eval_key, generate_eval_shard_in_child

root, work = sys.argv[1], sys.argv[2]
cfg = load_config(preset="tiny-cpu", overrides=[
    f"storage.url={root}", "generation.engine=vllm", "data.num_eval_prompts=4",
    "evaluation.samples_per_prompt=2", "evaluation.gpu_memory_utilization=0.3"])
model = build_tiny_model(f"{work}/tiny", seed=0)
run = open_store(root).run("ev", create=True)
run.write_config(cfg.model_dump(mode="json"))
rows = [{"prompt_id": f"e{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i), "task": "arithmetic"}
        for i in range(4)]
run.write_prompts("eval", pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA))
run.write_prompts("train", pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA))
run.publish_weights(0, model)
generator = VLLMEngine(str(model), dtype="float32", gpu_memory_utilization=0.3, max_batch_size=4)
generate_eval_shard_in_child(cfg, "ev", 0)
table = run.read_shard("eval", eval_key(0))
print("EVAL_ROWS", table.num_rows, sorted(set(table.column("prompt_id").to_pylist())))
print("SCORED", all(r is not None for r in table.column("reward_reason").to_pylist()))
(group,) = generator.generate([GroupRequest("p", "1+1=", 2)], SamplingSettings(max_new_tokens=4))
print("PARENT_ENGINE_OK", len(group))
generator.close()
"""


def test_vllm_evaluation_runs_beside_a_live_generator_engine(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "runs"), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "EVAL_ROWS 8 ['e0', 'e1', 'e2', 'e3']" in out, out
    assert "SCORED True" in out
    assert "PARENT_ENGINE_OK 2" in out


def test_vllm_memory_shares_are_checked():
    from scalerl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="evaluation.gpu_memory_utilization"):
        load_config(
            overrides=[
                "generation.gpu_memory_utilization=0.9",
                "evaluation.gpu_memory_utilization=0.1",
            ]
        )


def test_kill_tree_takes_the_grandchildren_a_plain_kill_would_orphan():
    # A hung evaluation child is killed with the processes it started (vLLM's engine core
    # runs in its own process): a child that started a sleeping grandchild, both gone after.
    import psutil

    from runtime.evaluation import kill_tree

    code = (
        "import subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(g.pid, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grandchild = int(proc.stdout.readline())
    assert psutil.pid_exists(grandchild)
    kill_tree(proc)
    assert proc.returncode is not None  # killed and reaped
    # gone, or dead and waiting for init to reap it; a loaded machine may show it running for
    # a moment after the SIGKILL was sent (seen under a parallel test load)
    deadline = time.monotonic() + 10
    with contextlib.suppress(psutil.NoSuchProcess):
        while psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the grandchild outlived kill_tree"
            time.sleep(0.05)
