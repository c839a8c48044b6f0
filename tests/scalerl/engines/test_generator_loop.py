"""The generator loop: batching of finished groups, stop conditions, versions, on the
transformers engine and the tiny model."""

import pytest

from scalerl.curriculum import CurriculumExhausted
from scalerl.engines.base import SamplingSettings
from scalerl.engines.hf import TransformersEngine
from scalerl.generator import GeneratorSettings, generate_batches

SAMPLING = SamplingSettings(max_new_tokens=12, temperature=1.0, seed=3)


class FiniteSampler:
    """Hands out prompts p0..p{n-1} once, then raises CurriculumExhausted."""

    def __init__(self, n: int) -> None:
        self.left = [(f"p{i}", f"Question {i}: {i}+{i}=?") for i in range(n)]
        self.asked: list[int] = []

    def __call__(self, k: int):
        self.asked.append(k)
        if not self.left:
            raise CurriculumExhausted("all retired")
        out, self.left = self.left[:k], self.left[k:]
        return out


def endless(k: int):
    return [(f"q{i}", f"Loop {i}") for i in range(k)]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return TransformersEngine(str(tiny_model), max_batch_size=4)


def settings(**kw) -> GeneratorSettings:
    return GeneratorSettings(
        **{"groups_per_batch": 2, "samples_per_prompt": 3, "sampling": SAMPLING, **kw}
    )


def test_batches_hold_complete_groups_until_prompts_run_out(engine):
    sampler = FiniteSampler(5)
    batches = list(generate_batches(engine, sampler, settings()))
    assert [len(b.groups) for b in batches] == [2, 2, 1]
    assert [b.index for b in batches] == [0, 1, 2]
    ids = sorted(g[0].prompt_id for b in batches for g in b.groups)
    assert ids == [f"p{i}" for i in range(5)]
    for b in batches:
        for g in b.groups:
            assert [c.sample_index for c in g] == [0, 1, 2]
            assert len({c.prompt_id for c in g}) == 1
        assert b.started_at <= b.finished_at and (b.min_version, b.max_version) == (0, 0)
    assert set(sampler.asked) == {2}  # asked lazily, a batch's worth at a time


def test_max_groups_bounds_the_total(engine):
    batches = list(generate_batches(engine, endless, settings(max_groups=3)))
    assert [len(b.groups) for b in batches] == [2, 1]


def test_stop_signal_ends_the_loop_and_keeps_finished_groups(engine):
    checks = iter(range(1, 100))  # should_stop is asked once per finished group

    def after_two_groups() -> bool:
        return next(checks) >= 2

    stream = generate_batches(
        engine, endless, settings(groups_per_batch=4), should_stop=after_two_groups
    )
    batches = list(stream)
    assert [len(b.groups) for b in batches] == [2]
    # the engine was left clean: a new loop runs normally
    assert [len(b.groups) for b in generate_batches(engine, FiniteSampler(2), settings())] == [2]


def test_batches_carry_the_versions_picked_up_in_flight(tiny_model, scheduled):
    engine = TransformersEngine(str(tiny_model), max_batch_size=4)
    source = scheduled(1, tiny_model, at=30)
    batches = list(generate_batches(engine, FiniteSampler(8), settings(), weights=source))
    assert batches[0].min_version == 0 and batches[-1].max_version == 1
    for c in (c for b in batches for c in b.completions):
        assert c.versions == sorted(c.versions)  # versions never go back within a sample


def test_a_closed_gate_holds_new_prompts_without_freezing_the_batch_in_flight(tiny_model):
    """The gate is asked before each batch's prompts with the batches drawn but not yet
    emitted; while it refuses, the engine finishes what it has (HOLD) and nothing new starts.
    Samples are seeded per (prompt, index), so the completions equal an ungated run's."""
    engine = TransformersEngine(str(tiny_model), max_batch_size=4)
    calls: list[int] = []
    emitted: list[int] = []
    refusals = [0]

    def gate(in_flight: int) -> bool:
        calls.append(in_flight)
        if in_flight > 0:  # only one batch in flight at a time
            refusals[0] += 1
            return False
        return True

    gated = []
    for b in generate_batches(engine, FiniteSampler(6), settings(), may_start=gate):
        emitted.append(len(calls))
        gated.append(b)
    free = list(generate_batches(engine, FiniteSampler(6), settings()))
    assert [len(b.groups) for b in gated] == [2, 2, 2]
    # the first batch's prompts started at once; the next ones waited for the batch before
    assert calls[0] == 0 and refusals[0] > 0 and set(calls) == {0, 1}
    # a batch emitted before the gate let the next one start: in flight was 0 again
    assert emitted[0] <= calls.index(0, 1)
    key = lambda bs: {(c.prompt_id, c.sample_index): c.token_ids for b in bs for c in b.completions}  # noqa: E731
    assert key(gated) == key(free)


def test_a_stop_while_held_ends_the_loop(tiny_model):
    """Nothing in flight and the gate closed for good: only a stop can end the loop, and it
    must, although no group finishes any more to trigger the usual check."""
    engine = TransformersEngine(str(tiny_model), max_batch_size=4)
    calls = [0]

    def gate(in_flight: int) -> bool:
        calls[0] += 1
        assert calls[0] < 10_000, "held forever: the stop was never looked at"
        return calls[0] == 1  # the first batch only

    batches = list(
        generate_batches(
            engine, endless, settings(), may_start=gate, should_stop=lambda: calls[0] > 5
        )
    )
    assert [len(b.groups) for b in batches] == [2] and 5 < calls[0] < 10


@pytest.mark.parametrize("kw", [dict(groups_per_batch=0), dict(samples_per_prompt=0)])
def test_invalid_settings_are_rejected(kw):
    with pytest.raises(ValueError, match="Fix:"):
        settings(**kw)
