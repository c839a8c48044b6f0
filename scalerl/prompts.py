"""Prompt rendering: what the model sees, from a dataset row (its prompt or chat) and the tokenizer.

    renderer = PromptRenderer.for_config(config, tokenizer)      # checks first, one line each
    text = renderer.render(row)          # '<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n'
    kept, dropped = render_rows(rows, renderer, max_prompt_tokens=1024)

data.chat_template: 'auto' renders with the tokenizer's chat template when it has one (Qwen3 and
every reasoning model are trained on theirs), raw text otherwise (the builtin tiny model); 'none'
is raw text; a path is a Jinja file used instead of the tokenizer's. data.system_prompt comes
first as a system turn; data.enable_thinking is passed to templates that take it. A row with
"messages" (data.messages_column, a JSON list of {role, content}) is rendered as that chat; one
with only "prompt" as a single user turn.

The rendered text is the rollout's `prompt`, and the engines encode it with
add_special_tokens=False, which is exactly apply_chat_template's ids (the template writes any BOS
itself, so there is no second one, and special tokens in the text, `<|im_start|>`, `<think>`,
come back as their single ids). Rows whose rendered prompt has more than
generation.max_prompt_tokens tokens are dropped, counted and logged, never truncated. Each kept
prompt's ids must decode back to its text (lossy_round_trip: a tokenizer missing characters of
the data drops them silently); more than LOSSY_MAX_SHARE of a split lossy is refused, fewer are
counted and logged. A model's positions must hold max_prompt_tokens + max_new_tokens
(check_context_fits).

Rendering happens once, where the run is prepared: the prompt splits of the run hold rendered
text, and generation and evaluation read those (one renderer per run, never a second copy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalerl.config import HELDOUT_SET


class PromptError(ValueError):
    """A template, tokenizer or setting that cannot render the run's prompts; one line with the fix."""


# The builtin models' positions: scalerl.models.build_tiny_model's max_position_embeddings
# (builtin:tiny and builtin:tiny-warm; tests/scalerl/test_models_checks.py holds them equal).
BUILTIN_MAX_POSITIONS = 4096


def model_positions(model_config) -> tuple[int | None, str]:
    """The positions a model can attend over, from its config (a transformers config or the
    dict of config.json), and the field they came from: max_position_embeddings (n_positions
    for GPT-2-style configs), times a RoPE scaling factor when one is configured (YaRN and
    linear scaling extend the context the engines accept). (None, '') when the config says none."""

    def get(obj, key):
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    text = get(model_config, "text_config") or model_config
    for key in ("max_position_embeddings", "n_positions"):
        positions = get(text, key)
        if isinstance(positions, int) and positions > 0:
            break
    else:
        return None, ""
    rope = get(text, "rope_scaling") or get(text, "rope_parameters") or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if isinstance(factor, int | float) and factor > 1 and rope.get("rope_type") != "dynamic":
        base = rope.get("original_max_position_embeddings") or positions
        return max(positions, int(base * factor)), f"{key} with RoPE scaling factor {factor}"
    return positions, key


def check_context_fits(positions: int | None, where: str, model: str, generation) -> None:
    """Raise PromptError when a prompt of generation.max_prompt_tokens plus a completion of
    generation.max_new_tokens cannot fit the model's positions: the engine would cut every long
    completion at the context end (finish_reason 'length') without saying why."""
    need = generation.max_prompt_tokens + generation.max_new_tokens
    if positions is None or need <= positions:
        return
    room = positions - generation.max_prompt_tokens
    fix = (
        f"lower generation.max_new_tokens to at most {room:,} ({positions:,} - "
        f"{generation.max_prompt_tokens:,})"
        if room > 0
        else f"lower generation.max_prompt_tokens below {positions:,} first"
    )
    raise PromptError(
        f"generation.max_prompt_tokens + generation.max_new_tokens = "
        f"{generation.max_prompt_tokens:,} + {generation.max_new_tokens:,} = {need:,} tokens, but "
        f"model {model} has {positions:,} positions ({where}), so completions would be cut at the "
        f"end of its context. Fix: {fix}, or use a model with a longer context."
    )


def eval_split(name: str) -> str:
    """The run's prompt split of evaluation set `name`: 'eval' for the held-out set (as before
    sets existed), 'eval-{name}' for a set of evaluation.sets."""
    return "eval" if name == HELDOUT_SET else f"eval-{name}"


def row_messages(row: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat of a row: its "messages" (JSON text or a list), else one user turn of its
    "prompt"; `system_prompt` first unless the chat already opens with a system turn."""
    messages = row.get("messages")
    if isinstance(messages, str):
        messages = json.loads(messages)
    chat = list(messages) if messages else [{"role": "user", "content": row["prompt"]}]
    if system_prompt and not (chat and chat[0].get("role") == "system"):
        chat = [{"role": "system", "content": system_prompt}, *chat]
    return chat


@dataclass
class PromptRenderer:
    """Renders rows for one tokenizer; `template` None means raw text (the row's prompt)."""

    tokenizer: Any | None
    template: str | None = None
    system_prompt: str | None = None
    enable_thinking: bool | None = None
    source: str = "none"  # where the template came from, for messages: 'none', 'tokenizer', a path
    _kwargs: dict[str, Any] = field(default_factory=dict)
    load_tokenizer: Any = None  # () -> tokenizer, for counting when `tokenizer` is None

    @property
    def raw(self) -> bool:
        return self.template is None

    @classmethod
    def for_config(cls, config, tokenizer, *, load_tokenizer=None) -> PromptRenderer:
        """The run's renderer, checked: a template path that does not exist, a template that does
        not render, settings a raw prompt cannot honour (system_prompt, messages_column,
        enable_thinking without a template that takes it) each raise one PromptError."""
        data = config.data
        choice = data.chat_template
        if choice == "none":
            template, source = None, "none"
        elif choice == "auto":
            template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
            source = "tokenizer" if template else "none"
        else:
            path = Path(choice).expanduser()
            if not path.is_file():
                raise PromptError(
                    f"data.chat_template = {choice!r} is neither 'auto', 'none' nor an existing "
                    "file. Fix: give the path of a Jinja chat template, or auto / none."
                )
            template, source = path.read_text(encoding="utf-8"), str(path)
            if tokenizer is None and load_tokenizer is not None:
                tokenizer = load_tokenizer()  # the builtin model's, to render with
        if template is None:
            why = (
                "data.chat_template = none"
                if choice == "none"
                else f"the tokenizer of {config.model.name_or_path} has no chat template"
            )
            for name, value in (
                ("data.system_prompt", data.system_prompt),
                ("data.messages_column", data.messages_column),
                ("data.enable_thinking", data.enable_thinking),
            ):
                if value is not None:
                    raise PromptError(
                        f"{name} is set but prompts go to the model as raw text ({why}). Fix: "
                        "set data.chat_template to auto with a tokenizer that has a chat template, "
                        f"or to a Jinja template file, or unset {name}."
                    )
        elif data.enable_thinking is not None and "enable_thinking" not in template:
            raise PromptError(
                f"data.enable_thinking = {data.enable_thinking} but the chat template "
                f"({source}) does not read enable_thinking, so it would change nothing. Fix: unset "
                "data.enable_thinking, or use a template that takes it (e.g. Qwen3's)."
            )
        kwargs = {} if data.enable_thinking is None else {"enable_thinking": data.enable_thinking}
        renderer = cls(
            tokenizer,
            template,
            data.system_prompt,
            data.enable_thinking,
            source,
            kwargs,
            load_tokenizer,
        )
        if template is not None:
            renderer._check_renders()
        return renderer

    def _check_renders(self) -> None:
        probe = {"prompt": "What is 1 + 1?"}
        try:
            text = self.render(probe)
        except Exception as exc:  # jinja2 raises TemplateError subclasses, templates raise anything
            msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise PromptError(
                f"the chat template ({self.source}) does not render a one-turn chat: "
                f"{type(exc).__name__}: {msg}. Fix: correct the template, or set "
                "data.chat_template to none (raw text) or to another template file."
            ) from None
        if "What is 1 + 1?" not in text:
            raise PromptError(
                f"the chat template ({self.source}) renders a chat without its user message. "
                "Fix: the template must write each message's content (see the tokenizer's "
                "chat_template for an example)."
            )

    def render(self, row: dict[str, Any]) -> str:
        """The text the model sees for `row` (raw: the row's prompt unchanged)."""
        if self.template is None:
            return row["prompt"]
        return self.tokenizer.apply_chat_template(
            row_messages(row, self.system_prompt),
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=True,
            **self._kwargs,
        )

    def count_tokens(self, text: str, limit: int) -> int:
        """Tokens of a rendered prompt as the engines encode it; without a tokenizer (the
        builtin model's raw text) its UTF-8 byte count, an upper bound for any byte-level
        tokenizer, so a prompt under `limit` bytes needs no tokenizer."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            n = len(text.encode("utf-8"))
            if n <= limit or self.load_tokenizer is None:
                return n
            tokenizer = self.tokenizer = self.load_tokenizer()
        return len(tokenizer.encode(text, add_special_tokens=False))

    def count_and_check(self, text: str, limit: int) -> tuple[int, str | None]:
        """count_tokens(text, limit), and with a model tokenizer the text its ids decode to when
        that is not `text` (None when the round trip keeps it: see lossy_round_trip). Without a
        tokenizer (the builtin models' byte tokenizer, lossless by construction) never lossy."""
        if self.tokenizer is None:
            return self.count_tokens(text, limit), None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        back = self.tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return len(ids), back if lossy_round_trip(text, back) else None


def lossy_round_trip(text: str, back: str) -> bool:
    """Whether decode(encode(text)) lost what the model should see: characters the vocabulary
    cannot encode (dropped, or an unknown token). Not a loss: what the tokenizer's own
    normalisation changes (Unicode NFC/NFKC forms, e.g. Qwen3's NFC) and whitespace runs."""
    if back == text:
        return False
    import unicodedata

    def squash(s: str) -> str:
        return "".join(unicodedata.normalize("NFKC", s).split())

    return squash(back) != squash(text)


def round_trip_example(prompt_id: str, text: str, back: str) -> str:
    """'p3: ...12 + 7?... comes back as ...12 + 7...' around the first difference."""
    i = next((i for i, (a, b) in enumerate(zip(text, back, strict=False)) if a != b), None)
    i = min(len(text), len(back)) if i is None else i
    lo = max(0, i - 20)
    return f"{prompt_id}: {text[lo : i + 20]!r} comes back as {back[lo : i + 20]!r}"


LOSSY_MAX_SHARE = 0.01  # more lossy prompts than this share of a split: refused


@dataclass
class RenderedRows:
    rows: list[dict[str, str]]
    dropped: list[str]  # prompt ids over the prompt budget
    longest: int  # tokens of the longest dropped prompt (0: none dropped)
    lossy: list[tuple[str, str, str]] = field(default_factory=list)  # (id, text, decoded)


def render_rows(
    rows: list[dict[str, str]], renderer: PromptRenderer, max_prompt_tokens: int
) -> RenderedRows:
    """Rows with "prompt" rendered (and "raw_prompt" holding the unrendered prompt, or the chat
    as JSON, when a template rendered it), without the prompts longer than max_prompt_tokens;
    `lossy` lists the kept prompts whose tokens do not decode back to them (lossy_round_trip)."""
    kept, dropped, longest, lossy = [], [], 0, []
    for row in rows:
        text = renderer.render(row)
        n, back = renderer.count_and_check(text, max_prompt_tokens)
        if n > max_prompt_tokens:
            dropped.append(row["prompt_id"])
            longest = max(longest, n)
            continue
        if back is not None:
            lossy.append((row["prompt_id"], text, back))
        out = {k: v for k, v in row.items() if k != "messages"}
        if not renderer.raw:
            out["raw_prompt"] = row.get("messages") or row["prompt"]
            out["prompt"] = text
        kept.append(out)
    return RenderedRows(kept, dropped, longest, lossy)


def check_thinking_tokens(config, tokenizer) -> None:
    """With length control on, the thinking terminator must be one token of the vocabulary (a
    reasoning model's `</think>`: 151668 in Qwen3), and the interruption phrase must end with
    it, so an injected phrase really closes the thinking the model was trained to close."""
    lc = config.length_control
    if not lc.enabled or tokenizer is None:
        return
    ids = tokenizer.encode(lc.think_end, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) != 1 or ids[0] == unk:
        raise PromptError(
            f"length_control.think_end = {lc.think_end!r} is not a token of the vocabulary of "
            f"{config.model.name_or_path} (it encodes to {len(ids)} tokens {ids[:6]}), so the "
            "model cannot end its thinking with it. Fix: set length_control.think_end to the "
            "model's end-of-thinking token, or length_control.enabled=false for a model that "
            "does not think in tags."
        )
    phrase = tokenizer.encode(lc.interruption_phrase, add_special_tokens=False)
    if phrase[-1:] != ids:
        raise PromptError(
            f"length_control.interruption_phrase does not end with the token "
            f"{lc.think_end!r} (id {ids[0]}): it ends with id {phrase[-1] if phrase else None}. "
            f"Fix: end the phrase with {lc.think_end!r}."
        )
