"""The run's prompts as the model sees them: every split loaded, rendered and length-checked once.

    prepared = prepare_prompts(config)           # before anything of the run is written
    prepared.splits["train"], prepared.splits["eval"], prepared.splits["eval-aime24"]
    prepared.summary()                           # rows for the "prompts" metrics stream

Splits: "train" and the held-out "eval" from data.source (scalerl.data.load_prompts), and one
"eval-{name}" per evaluation.sets entry (scalerl.data.load_eval_set). All go through one
PromptRenderer (scalerl/prompts.py) built from the run's tokenizer: the same template, system
prompt and thinking switch for training and every evaluation set. A prompt whose rendered text has
more than generation.max_prompt_tokens tokens is dropped and counted per split (never truncated);
one whose tokens do not decode back to its text (a tokenizer without some of its characters) is
counted, and more than LOSSY_MAX_SHARE (1%) of a split refused.

The tokenizer: the model's own (a local directory or a hub id through the local cache, at
model.revision), checked against the model's embedding rows and, with length control on, for a
single-token end of thinking; the model's positions (config.json, or the builtin models' 4,096)
must hold generation.max_prompt_tokens + max_new_tokens. The builtin models' character tokenizer has no chat template; their
raw prompts are counted by UTF-8 bytes (an upper bound), so no tokenizer is loaded unless a prompt
might be too long.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.logs import task_logger
from scalerl.config import HELDOUT_SET, RunConfig
from scalerl.prompts import (
    BUILTIN_MAX_POSITIONS,
    LOSSY_MAX_SHARE,
    PromptError,
    PromptRenderer,
    check_context_fits,
    check_thinking_tokens,
    eval_split,
    model_positions,
    render_rows,
    round_trip_example,
)


@dataclass
class PreparedPrompts:
    splits: dict[str, list[dict[str, str]]]
    # split -> (count, tokens of the longest, first ids)
    dropped: dict[str, tuple[int, int, list[str]]] = field(default_factory=dict)
    template: str = "none"

    @property
    def train(self) -> list[dict[str, str]]:
        return self.splits["train"]

    def summary(self, limit: int) -> list[dict]:
        return [
            {
                "split": split,
                "prompts": len(rows),
                "dropped_too_long": self.dropped.get(split, (0, 0, []))[0],
                "longest_dropped_tokens": self.dropped.get(split, (0, 0, []))[1],
                "max_prompt_tokens": limit,
                "chat_template": self.template,
            }
            for split, rows in self.splits.items()
        ]


def run_tokenizer(config: RunConfig, *, cached_only: bool = False):
    """The model's tokenizer (None for the builtin models, whose character tokenizer is built
    on demand), checked against the model: ModelLoadError / PromptError, one line each.
    `cached_only`: for a hub id, only what the local cache holds (NOT_CACHED when it lacks the
    tokenizer): the CLI's input check reaches no network."""
    return _tokenizer_and_context(config, cached_only=cached_only)[0]


def _tokenizer_and_context(config: RunConfig, *, cached_only: bool = False):
    """(tokenizer as run_tokenizer gives it, (positions, where they come from) or None when
    the model's config is not read here)."""
    name = config.model.name_or_path
    if name.startswith("builtin:"):
        return None, (BUILTIN_MAX_POSITIONS, "the builtin tiny models' max_position_embeddings")
    from scalerl.models import (
        _load_config,
        _looks_local,
        check_model,
        check_tokenizer_fits,
        load_tokenizer,
    )

    if _looks_local(name):  # the whole directory: weights' shapes, then the tokenizer
        tokenizer, model_config = check_model(name, with_config=True)
        return tokenizer, _positions(model_config)
    revision = config.model.revision
    if cached_only:
        from huggingface_hub import try_to_load_from_cache

        for file in ("tokenizer_config.json", "config.json"):
            if not isinstance(try_to_load_from_cache(name, file, revision=revision), str):
                return NOT_CACHED, None
    tokenizer = load_tokenizer(name, revision)
    model_config = _load_config(name, revision)
    check_tokenizer_fits(tokenizer, model_config, name)
    return tokenizer, _positions(model_config)


def _positions(model_config) -> tuple[int, str]:
    positions, field_name = model_positions(model_config)
    return positions, f"{field_name} in its config.json"


NOT_CACHED = object()  # run_tokenizer(cached_only=True): a hub model not in the local cache


def _tiny_tokenizer():
    from scalerl.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _load_splits(config: RunConfig) -> dict[str, list[dict[str, str]]]:
    from scalerl.data import load_eval_set, load_prompts

    base = load_prompts(config.data)
    raw = {"train": base.train}
    if config.data.num_eval_prompts:
        raw[eval_split(HELDOUT_SET)] = base.eval
    for spec in config.evaluation.sets:
        raw[eval_split(spec.name)] = load_eval_set(spec, config.data)
    return raw


def prepare_prompts(config: RunConfig, *, check_only: bool = False) -> PreparedPrompts:
    """Every split of the run, rendered and filtered (see the module docstring); raises
    DataError / PromptError / ModelLoadError before anything is written. Order: the tokenizer
    and the settings it must honour, then the data, then the model's positions against
    max_prompt_tokens + max_new_tokens, then each prompt's length and round trip.
    `check_only` (the CLI's input check): a hub model whose tokenizer is not in the local cache
    is not fetched; the data is still read whole, but not rendered (the run renders it)."""
    tokenizer, context = _tokenizer_and_context(config, cached_only=check_only)
    if tokenizer is NOT_CACHED:
        return PreparedPrompts(_load_splits(config), template="not checked (tokenizer not cached)")
    check_thinking_tokens(config, tokenizer)
    renderer = PromptRenderer.for_config(
        config, tokenizer, load_tokenizer=_tiny_tokenizer if tokenizer is None else None
    )
    raw = _load_splits(config)
    # a prompt and its completion must fit the model's positions: after the data (its own
    # errors come first), before any prompt is rendered
    check_context_fits(*context, config.model.name_or_path, config.generation)
    limit = config.generation.max_prompt_tokens
    out = PreparedPrompts({}, template=renderer.source)
    lossy: dict[str, tuple[int, int, str]] = {}  # split -> (lossy, kept, an example)
    for split, rows in raw.items():
        done = render_rows(rows, renderer, limit)
        if rows and not done.rows:
            raise PromptError(
                f"every prompt of split {split!r} ({len(rows)}) is longer than "
                f"generation.max_prompt_tokens = {limit} tokens after rendering (the longest has "
                f"{done.longest}). Fix: raise generation.max_prompt_tokens, or use shorter prompts."
            )
        out.splits[split] = done.rows
        if done.dropped:
            out.dropped[split] = (len(done.dropped), done.longest, done.dropped[:5])
        if done.lossy:
            lossy[split] = (len(done.lossy), len(done.rows), round_trip_example(*done.lossy[0]))
            if len(done.lossy) > LOSSY_MAX_SHARE * len(done.rows):
                raise PromptError(
                    f"{len(done.lossy):,} of the {len(done.rows):,} prompts of split {split!r} do "
                    f"not survive the tokenizer of {config.model.name_or_path} (their tokens "
                    f"decode to other text), e.g. {lossy[split][2]}: the model would see prompts "
                    "with characters missing. Fix: use the tokenizer saved with this model (its "
                    "vocabulary must cover every character of the data), or remove the prompts "
                    f"it cannot encode (at most {LOSSY_MAX_SHARE:.0%} of a split may differ)."
                )
    for split, (n, longest, first) in out.dropped.items():  # after every check passed
        task_logger().warning(
            "prompts %s: %d of %d dropped, longer than generation.max_prompt_tokens = %d after "
            "rendering (the longest has %d tokens; first ids: %s)",
            split,
            n,
            n + len(out.splits[split]),
            limit,
            longest,
            ", ".join(first),
        )
    for split, (n, kept, example) in lossy.items():  # few enough to run: said, not refused
        task_logger().warning(
            "prompts %s: %d of %d do not survive the tokenizer's round trip (kept as they are), "
            "e.g. %s",
            split,
            n,
            kept,
            example,
        )
    return out
