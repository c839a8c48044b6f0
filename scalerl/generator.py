"""The generator loop of PipelineRL (paper sec. 3.1): stream prompt groups through an engine
that picks up new weights between steps, and cut the finished groups into batches.

    batches = generate_batches(
        engine,
        sample_prompts=lambda n: [(pid, prompts[pid]) for pid in curriculum.sample(n)],
        settings=GeneratorSettings(groups_per_batch=48, samples_per_prompt=16,
                                   sampling=SamplingSettings(max_new_tokens=14_336),
                                   length=policy),
        weights=source,
    )
    for batch in batches:          # GeneratedBatch: complete groups, every token version-tagged
        store(batch)

Pure: no storage, no Prefect. The caller owns where prompts come from (``sample_prompts``,
asked lazily as the engine frees room, so curriculum retirements apply to the very next
prompts), where weights come from (``weights``) and where batches go.

Stopping: the prompts run out (``sample_prompts`` raises CurriculumExhausted or returns
nothing: in-flight groups are finished and emitted, then the loop ends), ``max_groups``
groups were produced, or ``should_stop()`` turns true (checked after every finished group
and while ``may_start`` holds the next batch back;
sequences in flight are dropped: completions are regenerated, never half-stored). The
groups finished before a stop are emitted as a last, possibly short, batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from scalerl.curriculum import CurriculumExhausted
from scalerl.engines.base import (
    HOLD,
    Completion,
    Engine,
    GroupRequest,
    SamplingSettings,
    WeightSource,
)
from scalerl.length_control import LengthPolicy

PromptSampler = Callable[[int], Sequence[tuple[str, str]]]
"""n -> up to n (prompt_id, prompt_text) pairs; raise CurriculumExhausted when none are left."""

StartGate = Callable[[int], bool]
"""in_flight -> may the next batch's prompts start now? in_flight = batches whose prompts were
drawn but which were not yet emitted. While False the engine keeps stepping what is in flight
(engines.base.HOLD) and asks again: backpressure that never freezes the batch in progress."""


@dataclass(frozen=True)
class GeneratorSettings:
    groups_per_batch: int
    """Prompt groups per emitted batch (paper: 48)."""
    samples_per_prompt: int
    """G completions per prompt (paper: 16)."""
    sampling: SamplingSettings
    length: LengthPolicy | None = None
    """Interruption length control; None enforces only sampling.max_new_tokens."""
    max_groups: int | None = None
    """Stop after this many groups in total (None: until the prompts run out or a stop)."""

    def __post_init__(self) -> None:
        if self.groups_per_batch < 1 or self.samples_per_prompt < 1:
            raise ValueError(
                f"groups_per_batch={self.groups_per_batch}, samples_per_prompt="
                f"{self.samples_per_prompt}. Fix: both must be >= 1."
            )


@dataclass(frozen=True)
class GeneratedBatch:
    """Complete groups (each a list of G Completions), ready to be stored as one shard."""

    index: int
    groups: list[list[Completion]]
    started_at: float
    finished_at: float

    @property
    def completions(self) -> list[Completion]:
        return [c for g in self.groups for c in g]

    @property
    def min_version(self) -> int | None:
        versions = [v for c in self.completions for v in c.versions]
        return min(versions) if versions else None

    @property
    def max_version(self) -> int | None:
        versions = [v for c in self.completions for v in c.versions]
        return max(versions) if versions else None


def _requests(
    sample_prompts: PromptSampler,
    settings: GeneratorSettings,
    may_start: StartGate | None,
    emitted: list[int],
    should_stop: Callable[[], bool],
) -> Iterator[GroupRequest | object]:
    """GroupRequests drawn lazily, a batch's worth of prompts per sampler call; HOLD while
    `may_start` refuses the next batch (emitted[0]: groups emitted so far), until a stop."""
    left, drawn = settings.max_groups, 0
    while left is None or left > 0:
        if may_start is not None:
            while not may_start(-(-(drawn - emitted[0]) // settings.groups_per_batch)):
                if should_stop():
                    return
                yield HOLD
        want = settings.groups_per_batch if left is None else min(left, settings.groups_per_batch)
        try:
            prompts = list(sample_prompts(want))
        except CurriculumExhausted:
            return
        if not prompts:
            return
        drawn += len(prompts[:want])
        for prompt_id, text in prompts[:want]:
            yield GroupRequest(prompt_id, text, settings.samples_per_prompt)
        if left is not None:
            left -= min(len(prompts), want)


def generate_batches(
    engine: Engine,
    sample_prompts: PromptSampler,
    settings: GeneratorSettings,
    *,
    weights: WeightSource | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    may_start: StartGate | None = None,
) -> Iterator[GeneratedBatch]:
    """Run the engine over sampled prompts and yield batches of complete groups; `may_start`
    (optional) holds back the next batch's prompts (StartGate)."""
    index, groups, started, emitted = 0, [], time.time(), [0]
    stream = engine.generate(
        _requests(sample_prompts, settings, may_start, emitted, should_stop),
        settings.sampling,
        length=settings.length,
        weights=weights,
    )
    try:
        for group in stream:
            groups.append(group)
            emitted[0] += 1
            if len(groups) == settings.groups_per_batch:
                yield GeneratedBatch(index, groups, started, time.time())
                index, groups, started = index + 1, [], time.time()
            if should_stop():
                break
    finally:
        stream.close()  # drops sequences still in flight
    if groups:
        yield GeneratedBatch(index, groups, started, time.time())
