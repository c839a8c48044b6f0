"""FSDP2 on 2 gloo ranks (CPU) with a bf16 parameter policy, as on GPUs with model.dtype bf16:

- the FP32 LM head multiplies the fp32 master weights: the head's weight is float32 while the
  policy runs, and its log-probabilities equal a float64 reference from the same master weights
  and hidden states, which a bf16-rounded head cannot match; with tied and untied embeddings;
- without the FP32 head (the ablation) the head stays in bf16;
- publishing the full state (full_model_state) all-gathers a tied embedding/head once.

One torchrun launch runs every case (spawning ranks is the slow part) and writes a JSON report
that the tests below read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scalerl.models import build_tiny_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]

# The fp32 head's error against float64: logits are sums of H = 64 products of O(1) hidden
# states and O(0.5) weights, |logit| <~ 10, and fp32 rounds each product and partial sum by
# 2**-24 relative: a few 1e-6 at worst, log-softmax over ~100 tokens adds about as much.
ATOL = 5e-5
# A bf16-rounded head weight is off by up to 2**-9 relative per element: its logits move by
# ~sqrt(64) * 1 * 0.5 * 1e-3 = 4e-3, so its error must be far above ATOL (or the test is blind).
BF16_MIN_ERROR = 20 * ATOL

SCRIPT = r"""
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import scalerl.trainer.step as step
from scalerl.fp32_head import head_weights
from scalerl.models import load_policy
from scalerl.trainer.distributed import DataParallel
from scalerl.trainer.step import PolicyLogprobs

out_path, cases = sys.argv[1], json.loads(sys.argv[2])
dp = DataParallel.from_env()
assert dp is not None and dp.world_size == 2, dp
seen = {}
real_head = step.logprobs_from_hidden

def spy(model, hidden, targets, **kw):  # what the head receives while the policy runs
    weight, _ = head_weights(model)
    seen["weight_dtype"] = str(weight.dtype)
    seen["hidden"] = hidden.detach().clone()
    out = real_head(model, hidden, targets, **kw)
    seen["out"] = out.detach().clone()
    return out

step.logprobs_from_hidden = spy
report = {}
for case in cases:
    torch.manual_seed(0)  # the same weights and batch on both ranks
    model, _ = load_policy(case["path"], dtype="float32", device="cpu")
    with torch.no_grad():  # O(1) logits, so that bf16 rounding of the head is visible
        model.get_output_embeddings().weight.mul_(25.0)
    master = {n: p.detach().clone() for n, p in model.named_parameters()}
    head_master = model.get_output_embeddings().weight.detach().double().clone()
    policy = PolicyLogprobs(model, fp32_head=case["fp32_head"], compute_dtype=torch.bfloat16)
    policy = dp.shard(policy, torch.bfloat16)
    ids = torch.randint(10, 100, (2, 12))
    positions = torch.arange(4, 11).expand(2, -1)
    targets = ids[:, 5:12]
    logp = policy(ids, torch.ones_like(ids), positions, targets)
    (-logp.sum()).backward()  # the root's gradients reduce-scatter too
    h = seen["hidden"].double()
    def reference(w):
        full = torch.log_softmax(h @ w.T, dim=-1)
        return full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = seen["out"].double()
    grad = model.get_output_embeddings().weight.grad
    row = {
        "weight_dtype": seen["weight_dtype"],
        "grad_dtype": str(grad.dtype),
        "error": float((got - reference(head_master)).abs().max()),
        "bf16_head_error": float(
            (reference(head_master.bfloat16().double()) - reference(head_master)).abs().max()
        ),
    }
    calls = []
    real_full = DTensor.full_tensor
    def counting(self, *a, **k):
        calls.append(tuple(self.shape))
        return real_full(self, *a, **k)
    DTensor.full_tensor = counting
    try:
        state = dp.full_model_state(policy, torch.bfloat16)
    finally:
        DTensor.full_tensor = real_full
    row["gathers"] = len(calls)
    row["parameters"] = len(list(model.parameters()))  # distinct parameters
    row["keys"] = len(list(model.named_parameters(remove_duplicate=False)))
    if dp.rank == 0:
        row["state_keys"] = len(state)
        row["state_error"] = max(
            float((state[n].float() - master[n].bfloat16().float()).abs().max()) for n in master
        )
        if "lm_head.weight" in state:
            row["head_aliases_embedding"] = (
                state["lm_head.weight"] is state["model.embed_tokens.weight"]
            )
    report[case["name"]] = row
if dp.rank == 0:
    with open(out_path, "w") as f:
        json.dump(report, f)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp-head")
    tied = build_tiny_model(root / "tied", seed=0, hidden_size=64, layers=2, heads=1)
    untied = build_tiny_model(
        root / "untied", seed=1, hidden_size=64, layers=2, heads=1, tie_word_embeddings=False
    )
    cases = [
        {"name": "tied", "path": str(tied), "fp32_head": True},
        {"name": "untied", "path": str(untied), "fp32_head": True},
        {"name": "bf16_head", "path": str(tied), "fp32_head": False},
    ]
    script, out = root / "fsdp_head.py", root / "report.json"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even on a GPU machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(script), str(out), json.dumps(cases)]  # --standalone: a free port, no clash
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["tied", "untied"])
def test_fp32_head_multiplies_fp32_master_weights_under_fsdp2(report, case):
    row = report[case]
    assert row["weight_dtype"] == "torch.float32", row  # not the bf16 cast of the root
    assert row["grad_dtype"] == "torch.float32", row
    assert row["error"] <= ATOL, row
    assert row["bf16_head_error"] > BF16_MIN_ERROR, row  # a bf16 head would fail the line above


def test_without_fp32_head_the_head_stays_bf16(report):
    # the no-fp32-head ablation must keep its low-precision head under FSDP2 too
    assert report["bf16_head"]["weight_dtype"] == "torch.bfloat16", report["bf16_head"]


def test_published_state_gathers_a_tied_head_once(report):
    tied, untied = report["tied"], report["untied"]
    assert tied["keys"] == tied["parameters"] + 1  # the head is the embedding
    assert tied["gathers"] == tied["parameters"], tied  # one all-gather per distinct tensor
    assert tied["state_keys"] == tied["keys"] and tied["head_aliases_embedding"] is True
    assert untied["gathers"] == untied["parameters"] == untied["keys"], untied
    assert untied["head_aliases_embedding"] is False
    for row in (tied, untied):  # the published values are the master weights cast to bf16
        assert row["state_error"] == 0.0, row
