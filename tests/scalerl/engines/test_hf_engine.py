"""TransformersEngine: greedy parity with transformers, FP32-head logprobs, continuous
batching, in-flight weight updates, interruptions and bad input, on the tiny model."""

import math

import pytest
import torch

from scalerl.engines.base import EngineError, GroupRequest, SamplingSettings
from scalerl.engines.hf import TransformersEngine, sample_tokens
from scalerl.fp32_head import token_logprobs
from scalerl.length_control import INTERRUPTION_PHRASE, LengthPolicy
from scalerl.models import ModelLoadError, build_tiny_model, load_policy

PROMPTS = ["Q: 2+3?", "Question 7: what is 12 * 4? Think first.", "x", "Say hi. " * 6]


def requests(n: int = 2) -> list[GroupRequest]:
    return [GroupRequest(f"p{i}", text, n) for i, text in enumerate(PROMPTS)]


def by_key(groups) -> dict:
    return {(c.prompt_id, c.sample_index): c for g in groups for c in g}


@pytest.fixture(scope="module")
def reference(tiny_model):
    return load_policy(str(tiny_model))


def test_greedy_matches_transformers_generate_and_fp32_logprobs(tiny_model, reference):
    model, tok = reference
    engine = TransformersEngine(str(tiny_model), max_batch_size=3)  # < 8 samples: rows refill
    groups = list(engine.generate(requests(), SamplingSettings(max_new_tokens=24, temperature=0)))
    assert sorted(g[0].prompt_id for g in groups) == ["p0", "p1", "p2", "p3"]
    for c in (c for g in groups for c in g):
        ids = torch.tensor([c.prompt_token_ids])
        expected = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        assert c.token_ids == expected
        with torch.no_grad():
            full = torch.tensor([c.prompt_token_ids + c.token_ids])
            ref_lp = token_logprobs(model, full)[0, len(c.prompt_token_ids) - 1 :]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref_lp, atol=1e-5, rtol=0)
        assert c.versions == [0] * len(c.token_ids) and all(c.sampled)
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason == ("stop" if c.token_ids[-1] == tok.eos_token_id else "length")


def test_samples_do_not_depend_on_batch_composition(tiny_model):
    settings = SamplingSettings(max_new_tokens=60, temperature=1.0, top_p=0.95, seed=11)
    runs = [
        by_key(
            TransformersEngine(str(tiny_model), max_batch_size=bs).generate(requests(3), settings)
        )
        for bs in (1, 5)
    ]
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 12
    for key, c in runs[0].items():
        assert c.token_ids == runs[1][key].token_ids
        torch.testing.assert_close(
            torch.tensor(c.logprobs), torch.tensor(runs[1][key].logprobs), atol=1e-5, rtol=0
        )
    # different samples of one prompt differ (their seeds do)
    assert runs[0][("p1", 0)].token_ids != runs[0][("p1", 1)].token_ids


def test_sampling_follows_softmax_with_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n, t, top_p = 20_000, 0.7, 0.8
    tokens, logps = sample_tokens(
        logits.expand(n, -1), torch.arange(n), torch.zeros(n, dtype=torch.long), t, top_p
    )
    p = torch.softmax(logits / t, -1)
    keep = (torch.cumsum(p, 0) - p) < top_p  # smallest prefix (sorted logits) reaching top_p
    q = torch.where(keep, p, 0.0) / p[keep].sum()
    freq = torch.bincount(tokens, minlength=5).double() / n
    for k in range(5):  # 5 standard errors
        assert abs(freq[k] - q[k]) <= 5 * math.sqrt(q[k] * (1 - q[k]) / n) + 1e-9
    torch.testing.assert_close(logps, q[tokens].log().float(), atol=1e-5, rtol=0)


def test_in_flight_update_changes_later_tokens_without_restarting(tiny_model, scripted, scheduled):
    tok = load_policy(str(tiny_model))[1]
    z = tok.convert_tokens_to_ids("Z")
    always_z = scripted("always_z", {}, z)
    settings = SamplingSettings(max_new_tokens=30, temperature=0)
    reqs = [GroupRequest("a", "Hello there", 2), GroupRequest("b", "Q: 1+1?", 2)]
    baseline = by_key(
        TransformersEngine(str(tiny_model), max_batch_size=2).generate(reqs, settings)
    )
    engine = TransformersEngine(str(tiny_model), max_batch_size=2)
    source = scheduled(1, always_z, at=11)  # before the 11th engine step
    got = by_key(engine.generate(reqs, settings, weights=source))
    assert engine.version == 1
    for key in [("a", 0), ("a", 1)]:  # in flight at the update
        c = got[key]
        k = c.versions.index(1)
        assert 5 < k < 20 and c.versions == [0] * k + [1] * (len(c.versions) - k)
        assert c.token_ids[:k] == baseline[key].token_ids[:k]  # not restarted
        assert c.token_ids[k:] == [z] * (30 - k) and baseline[key].token_ids[k:] != [z] * (30 - k)
    for key in [("b", 0), ("b", 1)]:  # started after the update
        assert got[key].versions == [1] * 30 and got[key].token_ids == [z] * 30


def test_a_group_admitted_in_parts_is_prefilled_once_per_weight_version(
    tiny_model, scripted, scheduled
):
    # 2 rows, one group of 4: members 0-1 start, 2-3 wait for their rows. The prompt's prefill
    # is kept for them, unless new weights arrived meanwhile (then it is redone with those:
    # the first token's logprob is tagged with the loaded version and must come from it).
    tok = load_policy(str(tiny_model))[1]
    z = tok.convert_tokens_to_ids("Z")
    settings = SamplingSettings(max_new_tokens=5, temperature=0, ignore_eos=True)
    reqs = [GroupRequest("a", "Hello there", 4)]

    def run(weights=None):
        engine = TransformersEngine(str(tiny_model), max_batch_size=2)
        calls, extend = [], engine._extend
        engine._extend = lambda prefix, tokens: (
            calls.append(prefix is None) or extend(prefix, tokens)
        )
        return by_key(engine.generate(reqs, settings, weights=weights)), calls

    plain, calls = run()
    assert calls == [True]  # one prefill for four members admitted in two parts
    assert len({tuple(c.token_ids) for c in plain.values()}) == 1  # greedy: all alike
    updated, calls = run(scheduled(1, scripted("always_z", {}, z), at=3))
    assert calls == [True, True]
    for i in (0, 1):  # in flight at the update: their first tokens were from version 0
        assert updated[("a", i)].versions[0] == 0
    for i in (2, 3):  # admitted after it: prefill and every token from version 1
        assert updated[("a", i)].versions == [1] * 5 and updated[("a", i)].token_ids == [z] * 5


def test_interruption_injects_phrase_and_counts_tokens(tiny_model, scripted):
    tok = load_policy(str(tiny_model))[1]
    a, end, eos = (tok.convert_tokens_to_ids(t) for t in ("a", "</think>", tok.eos_token))
    # "a a a ..." forever, but EOS right after "</think>"
    path = scripted("a_then_eos", {end: eos, eos: eos}, a)
    policy = LengthPolicy.from_tokenizer(
        tok, max_new_tokens=200, thinking_budget_min=4, thinking_budget_max=9, answer_budget=5
    )
    phrase = list(policy.interruption_ids)
    engine = TransformersEngine(str(path), max_batch_size=4)
    groups = list(engine.generate(requests(3), SamplingSettings(max_new_tokens=200), length=policy))
    budgets = set()
    for c in (c for g in groups for c in g):
        b = c.token_ids.index(phrase[0])
        budgets.add(b)
        assert 4 <= b <= 9 and c.token_ids == [a] * b + phrase + [eos]
        assert c.text == "a" * b + INTERRUPTION_PHRASE
        assert (c.finish_reason, c.interrupted) == ("interrupted", True)
        assert (c.thinking_tokens, c.answer_tokens) == (b + len(phrase), 1)
        assert c.sampled == [True] * b + [False] * len(phrase) + [True]
        assert all(lp == 0.0 for lp, s in zip(c.logprobs, c.sampled, strict=True) if not s)
        assert all(lp > -1e-3 for lp in c.logprobs)  # scripted tokens are certain
    assert len(budgets) > 1  # budgets are drawn per sample

    # without the EOS rule the answer runs into the answer budget: "length", still interrupted
    path = scripted("always_a", {}, a)
    c = next(
        iter(
            TransformersEngine(str(path)).generate(
                requests(1)[:1], SamplingSettings(max_new_tokens=200), length=policy
            )
        )
    )[0]
    assert (c.finish_reason, c.interrupted, c.answer_tokens) == ("length", True, 5)


def test_prompt_longer_than_context_fails_only_its_own_samples(tmp_path):
    short = build_tiny_model(tmp_path / "short", seed=0, max_position_embeddings=48)
    reqs = [
        GroupRequest("ok", "Q: 2+3?", 2),
        GroupRequest("long", "y" * 60, 2),
        GroupRequest("edge", "z" * 44, 1),
    ]
    settings = SamplingSettings(max_new_tokens=10, temperature=0)
    got = by_key(TransformersEngine(str(short), max_batch_size=2).generate(reqs, settings))
    alone = by_key(TransformersEngine(str(short)).generate(reqs[:1], settings))
    for i in range(2):
        bad = got[("long", i)]
        assert (bad.finish_reason, bad.token_ids, bad.logprobs) == ("length", [], [])
        assert "60 tokens" in bad.error and "Fix:" in bad.error
        assert (
            got[("ok", i)].token_ids == alone[("ok", i)].token_ids and got[("ok", i)].error is None
        )
    edge = got[("edge", 0)]  # 44 prompt tokens leave room for 4 of the 10 asked for
    assert (len(edge.token_ids), edge.finish_reason) == (4, "length")
    too_long = SamplingSettings(max_new_tokens=10, max_prompt_tokens=5)
    (group,) = TransformersEngine(str(short)).generate(reqs[:1], too_long)
    assert [c.finish_reason for c in group] == ["length", "length"]
    assert "at most 5 fit" in group[0].error


def test_bad_model_paths_and_weights_are_clear_errors(tmp_path, tiny_model):
    with pytest.raises(ModelLoadError, match="does not exist"):
        TransformersEngine(str(tmp_path / "missing"))
    engine = TransformersEngine(str(tiny_model))
    with pytest.raises(EngineError, match="no \\*.safetensors.*Fix"):
        engine.load_weights(1, tmp_path)
    engine.load_weights(1, build_tiny_model(tmp_path / "same", seed=1))
    for name, kw in [
        ("more", dict(layers=3)),
        ("fewer", dict(layers=1)),
        ("wider", dict(hidden_size=256)),
    ]:
        with pytest.raises(EngineError, match="do not fit the loaded model.*Fix"):
            engine.load_weights(2, build_tiny_model(tmp_path / name, seed=0, **kw))
    assert engine.version == 1


def test_closing_the_stream_early_leaves_the_engine_usable(tiny_model):
    engine = TransformersEngine(str(tiny_model), max_batch_size=2)
    settings = SamplingSettings(max_new_tokens=8, temperature=0)
    stream = engine.generate(requests(), settings)
    first = next(stream)
    stream.close()
    again = by_key(engine.generate(requests(), settings))
    assert [c.token_ids for c in first] == [
        again[(c.prompt_id, c.sample_index)].token_ids for c in first
    ]


def test_thinking_closed_in_time_continues_past_the_budget(tiny_model, scripted):
    tok = load_policy(str(tiny_model))[1]
    q, a, end = (tok.convert_tokens_to_ids(t) for t in ("?", "a", "</think>"))
    path = scripted(
        "close_at_once", {q: end, end: end}, a
    )  # "...?" -> "</think>" (which then repeats)
    policy = LengthPolicy.from_tokenizer(
        tok, max_new_tokens=40, thinking_budget_min=4, thinking_budget_max=6, answer_budget=5
    )
    reqs = [GroupRequest("q", "Why?", 2)]
    (group,) = TransformersEngine(str(path)).generate(
        reqs, SamplingSettings(max_new_tokens=40), length=policy
    )
    for c in group:
        assert c.token_ids == [end] * 40 and all(c.sampled)
        assert (c.finish_reason, c.interrupted) == ("length", False)
        assert (c.thinking_tokens, c.answer_tokens) == (1, 39)
