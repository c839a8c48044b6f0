"""Prompt rendering and length control with Qwen3's real tokenizer and chat template (vendored in
scalerl/assets/qwen3-tokenizer): what the model sees, token for token."""

from __future__ import annotations

import json

import pytest

from scalerl.config import RunConfig
from scalerl.length_control import INTERRUPTION_PHRASE, LengthPolicy
from scalerl.models import QWEN3_THINK_END_ID, build_tiny_tokenizer, qwen3_tokenizer_dir
from scalerl.prompts import PromptError, PromptRenderer, check_thinking_tokens, render_rows

THINK, END_THINK, IM_START, IM_END = 151667, 151668, 151644, 151645


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())


def cfg(**data) -> RunConfig:
    return RunConfig.model_validate({"model": {"name_or_path": "Qwen/Qwen3-0.6B"}, "data": data})


def template_ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_vendored_tokenizer_is_qwen3s(tok):
    assert len(tok) == 151_669
    assert tok.convert_tokens_to_ids(["<think>", "</think>", "<|im_end|>"]) == [
        THINK,
        END_THINK,
        IM_END,
    ]
    assert tok.eos_token == "<|im_end|>" and QWEN3_THINK_END_ID == END_THINK
    assert "enable_thinking" in tok.chat_template


@pytest.mark.parametrize("thinking", [None, True, False])
def test_rendered_ids_are_exactly_the_templates(tok, thinking):
    renderer = PromptRenderer.for_config(
        cfg(system_prompt="Put the final answer in \\boxed{}.", enable_thinking=thinking), tok
    )
    row = {"prompt_id": "p0", "prompt": "What is 6 x 7?", "answer": "42", "task": "math"}
    text = renderer.render(row)
    messages = [
        {"role": "system", "content": "Put the final answer in \\boxed{}."},
        {"role": "user", "content": "What is 6 x 7?"},
    ]
    kw = {} if thinking is None else {"enable_thinking": thinking}
    ids = tok.encode(text, add_special_tokens=False)  # what the engines do with the prompt
    assert ids == template_ids(tok, messages, **kw)
    assert ids[0] == IM_START and ids.count(IM_START) == 3  # system, user, assistant: no extra BOS
    assert text.startswith("<|im_start|>system\nPut the final answer")
    assert text.endswith(
        "<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if thinking is False else "")
    )
    # Qwen3's template: thinking off writes an empty, closed thinking block as single tokens
    assert (ids[-4:-1] == [THINK, 271, END_THINK]) is (thinking is False)


def test_chat_rows_render_the_chat_and_keep_the_raw_one(tok):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2 + 2?"},
    ]
    renderer = PromptRenderer.for_config(
        cfg(messages_column="prompt", system_prompt="ignored: the chat has one"), tok
    )
    row = {
        "prompt_id": "c",
        "prompt": "And 2 + 2?",
        "messages": json.dumps(chat),
        "answer": "4",
        "task": "math",
    }
    done = render_rows([row], renderer, max_prompt_tokens=512)
    (out,) = done.rows
    assert tok.encode(out["prompt"], add_special_tokens=False) == template_ids(tok, chat)
    assert json.loads(out["raw_prompt"]) == chat and "messages" not in out


def test_prompts_over_the_budget_are_dropped_not_truncated(tok):
    renderer = PromptRenderer.for_config(cfg(), tok)
    rows = [
        {"prompt_id": f"p{n}", "prompt": "word " * n, "answer": "1", "task": "math"}
        for n in (1, 40, 400)
    ]
    lengths = [len(tok.encode(renderer.render(r), add_special_tokens=False)) for r in rows]
    limit = lengths[1]  # exactly at the budget is kept
    done = render_rows(rows, renderer, limit)
    assert [r["prompt_id"] for r in done.rows] == ["p1", "p40"]
    assert done.dropped == ["p400"] and done.longest == lengths[2]
    assert all(r["prompt"] == renderer.render(x) for r, x in zip(done.rows, rows[:2], strict=True))


def test_raw_prompts_stay_as_they_were():
    tiny = build_tiny_tokenizer()  # no chat template: auto is raw text
    config = RunConfig.model_validate({"model": {"name_or_path": "builtin:tiny"}})
    renderer = PromptRenderer.for_config(config, tiny)
    row = {"prompt_id": "p", "prompt": "12 + 30 =", "answer": "42", "task": "arithmetic"}
    assert renderer.raw and render_rows([row], renderer, 64).rows == [row]
    # bytes bound the tokens of a byte-level tokenizer: no tokenizer needed under the limit
    lazy = PromptRenderer.for_config(config, None)
    assert lazy.count_tokens("12 + 30 =", 64) == 9


def test_interruption_phrase_ends_with_qwen3s_end_of_thinking_token(tok):
    policy = LengthPolicy.from_tokenizer(
        tok, max_new_tokens=64, thinking_budget_min=5, thinking_budget_max=5, answer_budget=8
    )
    assert policy.think_end_ids == (END_THINK,) and policy.think_start_ids == (THINK,)
    assert policy.interruption_ids[-1] == END_THINK
    assert tok.decode(policy.interruption_ids) == INTERRUPTION_PHRASE
    # a completion interrupted after 5 thinking tokens: phrase injected, counted as thinking,
    # then the answer budget of 8 applies after the special token
    seq = policy.start(0)
    sampled = tok.encode("<think>\nLet me add the numbers carefully", add_special_tokens=False)
    injected = ()
    for t in sampled:
        d = seq.push(t)
        if d.inject:
            injected = d.inject
            break
    assert seq.thinking_tokens == 5 + len(injected) and injected[-1] == END_THINK
    for _ in range(8):
        d = seq.push(tok.encode("1", add_special_tokens=False)[0])
    assert seq.answer_tokens == 8 and d.finish == "length" and seq.interrupted


def test_thinking_closed_by_the_prompt_is_all_answer(tok):
    """Through the engines' admission step (open_group), as every engine starts a sequence."""
    from scalerl.engines.base import GroupRequest, SamplingSettings, open_group
    from scalerl.length_control import CONTINUE

    policy = LengthPolicy.from_tokenizer(
        tok, max_new_tokens=64, thinking_budget_min=3, thinking_budget_max=3, answer_budget=2
    )
    off = tok.decode(template_ids(tok, [{"role": "user", "content": "hi"}], enable_thinking=False))
    on = tok.decode(template_ids(tok, [{"role": "user", "content": "hi"}], enable_thinking=True))
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")

    def sequence(prompt: str):
        _, seqs, done = open_group(
            GroupRequest("p", prompt, 2), tok, SamplingSettings(max_new_tokens=64), policy, 4096
        )
        assert done is None and len(seqs) == 2
        return seqs[0].length

    seq = sequence(off)
    for _ in range(20):  # far past the thinking budget of 3: no interruption
        assert seq.push(16) == CONTINUE
    assert not seq.interrupted and seq.answer_tokens == 20 and seq.thinking_tokens == 0
    # thinking on: interrupted at the budget, as is a prompt that opens <think> itself
    for prompt in (on, on + "<think>\n"):
        seq = sequence(prompt)
        assert seq.push(16) == seq.push(16) == CONTINUE
        assert seq.push(16).inject[-1] == END_THINK and seq.interrupted


def test_answers_inside_open_thinking_do_not_count():
    from scalerl.rewards.base import extract_final_answer

    prompt = "<|im_start|>assistant\n<think>\n"
    assert extract_final_answer("so it is \\boxed{4}", prompt=prompt) is None
    assert extract_final_answer("so 4</think>The answer is \\boxed{4}", prompt=prompt) == "4"
    assert extract_final_answer("\\boxed{4}", prompt="<think>\n\n</think>\n\n") == "4"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"chat_template": "/nonexistent/t.jinja"},
            "is neither 'auto', 'none' nor an existing file",
        ),
        (
            {"chat_template": "none", "system_prompt": "x"},
            "data.system_prompt is set but prompts go to the model as raw text",
        ),
        ({"chat_template": "none", "messages_column": "m"}, "data.messages_column is set but"),
    ],
)
def test_settings_a_renderer_cannot_honour(tok, data, message):
    with pytest.raises(PromptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PromptRenderer.for_config(cfg(**data), tok)


def test_templates_that_do_not_render_or_lack_enable_thinking(tok, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(PromptError, match="does not render a one-turn chat: TemplateSyntaxError"):
        PromptRenderer.for_config(cfg(chat_template=str(broken)), tok)
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    with pytest.raises(PromptError, match="does not read enable_thinking"):
        PromptRenderer.for_config(cfg(chat_template=str(plain), enable_thinking=True), tok)
    dropped = tmp_path / "dropped.jinja"
    dropped.write_text("{% for m in messages %}{{ m.role }}{% endfor %}")
    with pytest.raises(PromptError, match="renders a chat without its user message"):
        PromptRenderer.for_config(cfg(chat_template=str(dropped)), tok)
    renderer = PromptRenderer.for_config(cfg(chat_template=str(plain)), tok)
    assert renderer.render({"prompt": "2+2"}) == "user: 2+2\nassistant:"


def test_end_of_thinking_must_be_one_token(tok):
    check_thinking_tokens(cfg(), tok)  # Qwen3: </think> is token 151668
    bad = RunConfig.model_validate(
        {
            "model": {"name_or_path": "x"},
            "length_control": {
                "think_end": "</reasoning>",
                "interruption_phrase": "stop </reasoning>",
            },
        }
    )
    with pytest.raises(PromptError, match="is not a token of the vocabulary"):
        check_thinking_tokens(bad, tok)
    off = RunConfig.model_validate(
        {"length_control": {"enabled": False, "think_end": "</reasoning>"}}
    )
    check_thinking_tokens(off, tok)
    phrase = RunConfig.model_validate({"length_control": {"interruption_phrase": "Time is up."}})
    with pytest.raises(PromptError, match="does not end with the token '</think>' \\(id 151668\\)"):
        check_thinking_tokens(phrase, tok)
