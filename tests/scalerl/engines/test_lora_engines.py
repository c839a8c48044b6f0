"""LoRA versions in the engines (scalerl/lora.py): an engine started on the base model takes each
adapter in place, between steps, and samples what the trainer computes under that adapter.

The reference is the trainer's own computation: PolicyLogprobs (FP32 head) over prompt +
completion on the base model with the same adapter injected by peft. Tolerance 1e-4 in float32
for the transformers engine: the same model code, the KV cache built step by step instead of in
one forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scalerl.config import LoraConfig
from scalerl.engines.base import GroupRequest, SamplingSettings
from scalerl.engines.hf import TransformersEngine
from scalerl.lora import (
    ADAPTER_DIR,
    adapter_state,
    attach,
    copy_adapter,
    initial_adapter,
    save_adapter,
)
from scalerl.models import load_policy
from scalerl.trainer.step import PolicyLogprobs

LORA = LoraConfig(rank=4, alpha=8.0)
TOL = 1e-4


def trained_adapter(base: Path, seed: int) -> dict[str, torch.Tensor]:
    """An adapter as training leaves it: version 0's A, and a B drawn at random, large enough
    that the policy visibly changes (B starts at zero, which is the base model itself)."""
    tensors = initial_adapter(base, LORA, seed=0)
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g) * 0.5 if ".lora_B." in k else v
        for k, v in tensors.items()
    }


def version_dir(root: Path, tensors: dict) -> Path:
    """A published adapter version: only adapter/ (scalerl/lora.py)."""
    save_adapter(root / ADAPTER_DIR, tensors, LORA)
    return root


def trainer_logprobs(base: Path, tensors: dict, prompt: list[int], completion: list[int]):
    """log pi(completion | prompt) as the trainer computes it under the adapter `tensors`."""
    model, _ = load_policy(str(base))
    attach(model, LORA)
    copy_adapter(model, tensors)
    policy = PolicyLogprobs(model.eval(), fp32_head=True)
    ids = torch.tensor([prompt + completion])
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)[None]
    with torch.no_grad():
        return policy(ids, torch.ones_like(ids), positions, torch.tensor([completion]))[0]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        0: version_dir(root / "v0", initial_adapter(tiny_model, LORA, seed=0)),
        1: version_dir(root / "v1", trained_adapter(tiny_model, seed=1)),
    }


def by_key(groups):
    return {(c.prompt_id, c.sample_index): c for g in groups for c in g}


REQUESTS = [GroupRequest("a", "Hello there", 2), GroupRequest("b", "Q: 1+1?", 2)]


def test_version_zero_adapter_is_the_base_model(tiny_model, adapters):
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0, seed=3)
    plain = by_key(
        TransformersEngine(str(tiny_model), max_batch_size=4).generate(REQUESTS, settings)
    )
    engine = TransformersEngine(str(tiny_model), max_batch_size=4)
    engine.load_weights(0, adapters[0])
    got = by_key(engine.generate(REQUESTS, settings))
    for key, c in plain.items():
        assert got[key].token_ids == c.token_ids
        assert got[key].logprobs == pytest.approx(c.logprobs, abs=TOL)


def test_transformers_engine_swaps_adapters_in_flight(tiny_model, adapters, scheduled):
    settings = SamplingSettings(max_new_tokens=24, temperature=1.0, seed=5, ignore_eos=True)
    engine = TransformersEngine(str(tiny_model), max_batch_size=2)
    engine.load_weights(0, adapters[0])
    params = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    got = by_key(engine.generate(REQUESTS, settings, weights=scheduled(1, adapters[1], at=11)))
    assert engine.version == 1
    # in place: no parameter was reallocated by the swap
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == params
    v1 = trained_adapter(tiny_model, seed=1)
    for key in [("a", 0), ("a", 1)]:  # in flight at the update: not restarted
        c = got[key]
        k = c.versions.index(1)
        assert 0 < k < 24 and c.versions == [0] * k + [1] * (24 - k)
    for key in [("b", 0), ("b", 1)]:  # started after it: the trainer's logprobs under v1
        c = got[key]
        assert c.versions == [1] * 24
        ref = trainer_logprobs(tiny_model, v1, c.prompt_token_ids, c.token_ids)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=TOL), (c.logprobs, ref)
    # and the adapter matters: the base model gives these tokens other logprobs
    base = trainer_logprobs(tiny_model, initial_adapter(tiny_model, LORA, 0), *_pair(got))
    assert not torch.allclose(base, trainer_logprobs(tiny_model, v1, *_pair(got)), atol=1e-2)


def _pair(got):
    c = got[("b", 0)]
    return c.prompt_token_ids, c.token_ids


def test_initial_adapter_is_peft_default_drawn_from_the_seed(tiny_model):
    from safetensors.torch import load_file

    tensors = initial_adapter(tiny_model, LORA, seed=7)
    assert tensors.keys() == initial_adapter(tiny_model, LORA, seed=8).keys()
    assert all(
        torch.equal(v, initial_adapter(tiny_model, LORA, seed=7)[k]) for k, v in tensors.items()
    )
    hidden = load_file(str(tiny_model / "model.safetensors"))["model.embed_tokens.weight"].shape[1]
    for k, v in tensors.items():
        if ".lora_B." in k:
            assert torch.count_nonzero(v) == 0  # B = 0: version 0 is the base model
        else:  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert v.shape[0] == LORA.rank
            fan_in = v.shape[1]
            assert fan_in in (hidden, 2 * hidden)  # projections of width hidden or the MLP's
            assert v.abs().max() <= 1 / fan_in**0.5 and v.std() > 0.3 / fan_in**0.5
    # 2 adapters x 7 projections x 2 layers
    assert len(tensors) == 2 * 7 * 2


def test_adapter_state_round_trips_through_peft(tiny_model, tmp_path):
    """What save_adapter writes, peft itself loads (PeftModel.from_pretrained) to the same
    outputs: the format is peft's own, which vLLM reads too."""
    from peft import PeftModel

    tensors = trained_adapter(tiny_model, seed=2)
    version_dir(tmp_path / "v", tensors)
    ours, _ = load_policy(str(tiny_model))
    attach(ours, LORA)
    copy_adapter(ours, tensors)
    theirs = PeftModel.from_pretrained(
        load_policy(str(tiny_model))[0], tmp_path / "v" / ADAPTER_DIR
    )
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert adapter_state(ours).keys() == tensors.keys()


VLLM_SCRIPT = r"""
import json, sys, time
from pathlib import Path
from scalerl.config import LoraConfig
from scalerl.engines.base import GroupRequest, SamplingSettings

N = 48


class AfterSeconds:  # publishes version 1 once, at the first poll delay_s after the first
    def __init__(self, v1, delay_s):
        self.v1, self.delay_s, self.start, self.done = v1, delay_s, None, False

    def poll(self):
        now = time.monotonic()
        self.start = self.start or now
        if not self.done and now - self.start >= self.delay_s:
            self.done = True
            return 1, self.v1
        return None


def main():  # AsyncLLM's core starts in a spawned process: main-guarded
    v0, v1, out, kind = sys.argv[1:]
    if kind == "vllm":
        from scalerl.engines.vllm_engine import VLLMEngine as Engine
    else:
        from scalerl.engines.vllm_async import AsyncVLLMEngine as Engine
    engine = Engine(v0, dtype="float32", gpu_memory_utilization=0.3, max_batch_size=2,
                    lora=LoraConfig(rank=4, alpha=8.0))
    requests = [GroupRequest("a", "Hello there", 2), GroupRequest("b", "Q: 1+1?", 2)]
    settings = SamplingSettings(max_new_tokens=N, temperature=1.0, seed=5, ignore_eos=True)
    engine.load_weights(0, v0)
    start = time.monotonic()
    for g in engine.generate(requests, settings):  # how long "a" takes, for the timed switch
        if g[0].prompt_id == "a":
            a_done = time.monotonic() - start
    for _ in range(3):  # timed: on a busy machine the switch may miss the "a" samples
        engine.load_weights(0, v0)
        rows = [
            {"key": [c.prompt_id, c.sample_index], "prompt": c.prompt_token_ids,
             "tokens": c.token_ids, "logprobs": c.logprobs, "versions": c.versions}
            for g in engine.generate(requests, settings, weights=AfterSeconds(v1, 0.4 * a_done))
            for c in g
        ]
        a = [r["versions"] for r in rows if r["key"][0] == "a"]
        if all(0 < v.count(1) < N for v in a):
            break
    root = Path(engine._lora_root)
    engine.close()
    Path(out).write_text(json.dumps({"rows": rows, "version": engine.version,
                                     "root_left": root.exists()}))


if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vllm", "vllm-async"])
def test_vllm_engines_swap_adapters_in_flight(tiny_model, adapters, tmp_path, kind):
    """vLLM (CPU build) with LoRA: one adapter id, its files replaced and reloaded in place
    between steps. Its own process: vLLM allows one in-process engine per process."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("vllm")
    base = tmp_path / "v0"  # the base model with version 0's adapter, as prepare publishes it
    import shutil

    shutil.copytree(tiny_model, base)
    shutil.copytree(adapters[0] / ADAPTER_DIR, base / ADAPTER_DIR)
    script, out = tmp_path / "gen.py", tmp_path / "out.json"
    script.write_text(VLLM_SCRIPT)
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, str(script), str(base), str(adapters[1]), str(out), kind],
        cwd=repo, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["version"] == 1 and not result["root_left"]
    got = {tuple(r["key"]): r for r in result["rows"]}
    v1 = trained_adapter(tiny_model, seed=1)
    n = 48
    for key in [("a", 0), ("a", 1)]:  # in flight at the update: not restarted
        versions = got[key]["versions"]
        k = versions.index(1)
        assert 0 < k < n and versions == [0] * k + [1] * (n - k)
    for key in [("b", 0), ("b", 1)]:  # started after it: the trainer's logprobs under v1
        r = got[key]
        assert r["versions"] == [1] * n
        ref = trainer_logprobs(tiny_model, v1, r["prompt"], r["tokens"])
        assert torch.allclose(torch.tensor(r["logprobs"]), ref, atol=TOL), (r["logprobs"], ref)


def test_fully_trained_modules_travel_with_the_adapter(tiny_model, adapters, tmp_path):
    """model.lora.trained_modules: the RMSNorms ('norm' matches every one, as peft's
    modules_to_save matches) are trained in full beside the adapters, published in the same
    file as peft's modules_to_save (peft loads it to the same logits), and the transformers
    engine copies them in place with the adapter: its logprobs are the trainer's."""
    from peft import PeftModel

    lora = LoraConfig(rank=4, alpha=8.0, trained_modules=["norm"])
    model, _ = load_policy(str(tiny_model))
    attach(model, lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n in trainable if "norm" in n}
    assert norms and all(".lora_" in n for n in trainable - norms)
    assert len(norms) == 2 * 2 + 1  # input and post-attention norms of 2 layers, the final one
    g = torch.Generator().manual_seed(3)
    copy_adapter(model, trained_adapter(tiny_model, seed=1))
    with torch.no_grad():  # "trained" norms
        for n, p in model.named_parameters():
            if n in norms:
                p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))
    state = adapter_state(model)
    assert sum(".lora_" not in k for k in state) == len(norms)
    save_adapter(tmp_path / "v1" / ADAPTER_DIR, state, lora)
    config = json.loads((tmp_path / "v1" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["norm"]

    theirs = PeftModel.from_pretrained(
        load_policy(str(tiny_model))[0], tmp_path / "v1" / ADAPTER_DIR
    )
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, theirs(ids).logits, atol=1e-6)

    engine = TransformersEngine(str(tiny_model), max_batch_size=4)
    engine.load_weights(0, adapters[0])  # version 0: the base's norms
    engine.load_weights(1, tmp_path / "v1")
    settings = SamplingSettings(max_new_tokens=16, temperature=1.0, seed=2, ignore_eos=True)
    policy = PolicyLogprobs(model.eval(), fp32_head=True)
    for c in by_key(engine.generate(REQUESTS, settings)).values():
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        p = len(c.prompt_token_ids)
        positions = torch.arange(p - 1, p + len(c.token_ids) - 1)[None]
        with torch.no_grad():
            ref = policy(ids, torch.ones_like(ids), positions, torch.tensor([c.token_ids]))[0]
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=TOL)


@pytest.mark.parametrize("modules", [["self_attn"], ["layers"], ["model"]])
def test_trained_modules_that_reach_frozen_or_adapted_weights_are_refused(tiny_model, modules):
    """Module names match as suffixes (peft's rule): 'self_attn' holds the adapted projections,
    'layers' and 'model' the embedding (the tied LM head) too; one line each."""
    from scalerl.lora import LoraError

    model, _ = load_policy(str(tiny_model))
    with pytest.raises(LoraError, match=r"stays frozen .* or gets an adapter\. Fix: name"):
        attach(model, LoraConfig(rank=4, trained_modules=modules))


def test_version_zero_carries_the_base_values_of_trained_modules(tiny_model):
    from safetensors.torch import load_file

    lora = LoraConfig(rank=4, trained_modules=["norm"])
    tensors = initial_adapter(tiny_model, lora, seed=0)
    base = load_file(str(tiny_model / "model.safetensors"))
    norms = {k: v for k, v in tensors.items() if ".lora_" not in k}
    assert len(norms) == 5
    for k, v in norms.items():
        assert torch.equal(v, base[k.removeprefix("base_model.model.")])
