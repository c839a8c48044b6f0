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
groups were produced, or ``should_stop()`` turns true (checked after every finished group;
sequences in flight are dropped: completions are regenerated, never half-stored). The
groups finished before a stop are emitted as a last, possibly short, batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from scalerl.curriculum import CurriculumExhausted
from scalerl.engines.base import Completion, Engine, GroupRequest, SamplingSettings, WeightSource
from scalerl.length_control import LengthPolicy

PromptSampler = Callable[[int], Sequence[tuple[str, str]]]
"""n -> up to n (prompt_id, prompt_text) pairs; raise CurriculumExhausted when none are left."""


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


def _requests(sample_prompts: PromptSampler, settings: GeneratorSettings) -> Iterator[GroupRequest]:
    """GroupRequests drawn lazily, a batch's worth of prompts per sampler call."""
    left = settings.max_groups
    while left is None or left > 0:
        want = settings.groups_per_batch if left is None else min(left, settings.groups_per_batch)
        try:
            prompts = list(sample_prompts(want))
        except CurriculumExhausted:
            return
        if not prompts:
            return
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
) -> Iterator[GeneratedBatch]:
    """Run the engine over sampled prompts and yield batches of complete groups."""
    index, groups, started = 0, [], time.time()
    stream = engine.generate(
        _requests(sample_prompts, settings),
        settings.sampling,
        length=settings.length,
        weights=weights,
    )
    try:
        for group in stream:
            groups.append(group)
            if len(groups) == settings.groups_per_batch:
                yield GeneratedBatch(index, groups, started, time.time())
                index, groups, started = index + 1, [], time.time()
            if should_stop():
                break
    finally:
        stream.close()  # drops sequences still in flight
    if groups:
        yield GeneratedBatch(index, groups, started, time.time())
