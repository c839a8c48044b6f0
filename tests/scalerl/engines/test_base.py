"""Engine contract helpers: seeds, throttled weight polling, request validation."""

import pytest

from scalerl.engines.base import (
    EngineError,
    GroupRequest,
    SamplingSettings,
    Throttled,
    WeightSource,
    open_group,
    resolve_length,
    sample_seed,
)
from scalerl.length_control import LengthPolicy
from scalerl.models import build_tiny_tokenizer


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def poll(self):
        self.calls += 1
        return (self.calls, "/w")


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seed(0, "p1", 0) == sample_seed(0, "p1", 0)
    seeds = {sample_seed(s, p, i) for s in (0, 1) for p in ("p1", "p2") for i in range(4)}
    assert len(seeds) == 16 and all(0 <= x < 2**63 for x in seeds)


def test_throttled_source_asks_at_most_once_per_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("scalerl.engines.base.time.monotonic", lambda: clock[0])
    inner = Counter()
    source = Throttled(inner, interval_s=5.0)
    assert isinstance(source, WeightSource)
    assert source.poll() == (1, "/w")
    clock[0] += 4.9
    assert source.poll() is None and inner.calls == 1
    clock[0] += 0.2
    assert source.poll() == (2, "/w")


def test_open_group_rejects_empty_requests_and_finishes_empty_prompts():
    tok = build_tiny_tokenizer()
    settings = SamplingSettings(max_new_tokens=8)
    policy = resolve_length(None, settings, {tok.eos_token_id})
    with pytest.raises(EngineError, match="n=0.*Fix"):
        open_group(GroupRequest("p", "hi", 0), tok, settings, policy, 64)
    _, seqs, done = open_group(GroupRequest("p", "", 2), tok, settings, policy, 64)
    assert seqs == [] and [c.finish_reason for c in done] == ["length", "length"]
    assert "empty" in done[0].error


def test_ignore_eos_removes_eos_from_any_policy():
    tok = build_tiny_tokenizer()
    pol = LengthPolicy.from_tokenizer(
        tok, max_new_tokens=8, thinking_budget_min=2, thinking_budget_max=3, answer_budget=2
    )
    settings = SamplingSettings(max_new_tokens=8, ignore_eos=True)
    assert resolve_length(pol, settings, {tok.eos_token_id}).eos_ids == frozenset()
    assert resolve_length(None, settings, {tok.eos_token_id}).eos_ids == frozenset()
    assert tok.eos_token_id in resolve_length(pol, SamplingSettings(max_new_tokens=8), {0}).eos_ids


def test_both_vllm_engines_take_weights_in_place_and_transformers_need_not():
    """The transports call weight_transfer/set_version (InPlaceEngine): checked on the classes,
    with the protocol's signatures, without starting vLLM."""
    import inspect

    from scalerl.engines.base import Engine, InPlaceEngine
    from scalerl.engines.hf import TransformersEngine
    from scalerl.engines.vllm_async import AsyncVLLMEngine
    from scalerl.engines.vllm_engine import VLLMEngine

    for cls in (VLLMEngine, AsyncVLLMEngine):
        assert Engine in cls.__mro__ and InPlaceEngine in cls.__mro__
        for name in ("generate", "load_weights", "close", "weight_transfer", "set_version"):
            expected = inspect.signature(getattr(InPlaceEngine, name))
            assert inspect.signature(getattr(cls, name)) == expected, (cls, name)
        for name in ("load_weights", "close", "weight_transfer", "set_version"):
            assert getattr(cls, name) is not getattr(InPlaceEngine, name), (cls, name)
    assert Engine in TransformersEngine.__mro__
    assert InPlaceEngine not in TransformersEngine.__mro__
    assert not hasattr(TransformersEngine, "weight_transfer")
