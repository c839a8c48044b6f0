"""AsyncVLLMEngine (AsyncLLM, engine core in its own process) on the CPU build of vLLM: the
same greedy output as VLLMEngine, exact per-token versions across an in-flight weight
update, interruptions, and a clean close. One engine serves the module (start-up costs tens
of seconds); each test first reloads the base weights as version 0. VLLMEngine runs in a
subprocess (one per process, test_vllm_engine.py), started alongside the module's engine."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from scalerl.engines.base import HOLD, GroupRequest, SamplingSettings
from scalerl.length_control import INTERRUPTION_PHRASE, LengthPolicy

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow

PROMPTS = ["Q: 2+3?", "Question 7: what is 12 * 4? Think first.", "x", "Say hi. " * 6]

REFERENCE = """
import json, sys
from scalerl.engines.base import GroupRequest, SamplingSettings
from scalerl.engines.vllm_engine import VLLMEngine

if __name__ == "__main__":
    path, prompts = sys.argv[1], json.loads(sys.argv[2])
    engine = VLLMEngine(path, dtype="float32", gpu_memory_utilization=0.3, max_batch_size=8)
    reqs = [GroupRequest(f"p{i}", text, 2) for i, text in enumerate(prompts)]
    groups = engine.generate(reqs, SamplingSettings(max_new_tokens=32, temperature=0))
    out = {f"{c.prompt_id}/{c.sample_index}": [c.token_ids, c.logprobs, c.finish_reason]
           for g in groups for c in g}
    print("RESULT " + json.dumps(out))
    engine.close()
"""


def by_key(groups) -> dict:
    return {(c.prompt_id, c.sample_index): c for g in groups for c in g}


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """VLLMEngine's greedy completions of PROMPTS, computed in a subprocess started now."""
    script = tmp_path_factory.mktemp("reference") / "reference.py"
    script.write_text(REFERENCE)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tiny_model), json.dumps(PROMPTS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"},
        cwd=Path(__file__).parents[3],
    )

    def result() -> dict:
        stdout, stderr = proc.communicate(timeout=600)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, stderr[-3000:]
        raw = json.loads(lines[0].removeprefix("RESULT "))
        return {(k.split("/")[0], int(k.split("/")[1])): v for k, v in raw.items()}

    result.pid = proc.pid
    yield result
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def async_engine(tiny_model, reference):
    from scalerl.engines.vllm_async import AsyncVLLMEngine

    engine = AsyncVLLMEngine(
        str(tiny_model), dtype="float32", gpu_memory_utilization=0.3, max_batch_size=8
    )
    yield engine
    engine.close()


@pytest.fixture
def engine(async_engine, tiny_model):
    async_engine.load_weights(0, tiny_model)
    return async_engine


def test_greedy_matches_vllm_engine_with_holds_in_the_stream(engine, reference):
    """Greedy tokens and logprobs equal VLLMEngine's; HOLD items only delay requests."""
    reqs = [GroupRequest(f"p{i}", text, 2) for i, text in enumerate(PROMPTS)]
    stream = [reqs[0], HOLD, HOLD, reqs[1], HOLD, *reqs[2:]]
    got = by_key(engine.generate(stream, SamplingSettings(max_new_tokens=32, temperature=0)))
    ref = reference()
    assert got.keys() == ref.keys() and len(got) == 8
    for key, c in got.items():
        tokens, logprobs, finish_reason = ref[key]
        assert (c.token_ids, c.finish_reason) == (tokens, finish_reason)
        torch.testing.assert_close(
            torch.tensor(c.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=0
        )
        assert c.versions == [0] * len(tokens) and all(c.sampled)
    assert engine.head_dtype == torch.float32 and engine.context_len > 0


class AfterSeconds:
    """A WeightSource that publishes ``(version, path)`` once, at the first poll at least
    ``delay_s`` after its first poll (AsyncLLM steps on its own: polls are not steps)."""

    def __init__(self, version: int, path: Path, delay_s: float) -> None:
        self.version, self.path, self.delay_s = version, path, delay_s
        self.start: float | None = None
        self.published_at: float | None = None

    def poll(self):
        now = time.monotonic()
        self.start = self.start or now
        if self.published_at is None and now - self.start >= self.delay_s:
            self.published_at = now
            return self.version, self.path
        return None


def test_in_flight_update_tags_every_token_with_the_weights_that_sampled_it(
    engine, scripted, tiny_model
):
    """Mid-generation switch to weights that always predict "Z": no sequence restarts, every
    token before the switch is the base model's (version 0, base logprobs), every token from
    it on is "Z" with probability 1 (version 1). A tag off by one token in either direction
    puts a base token under version 1 or a "Z" under version 0 and fails."""
    z = engine.tokenizer.convert_tokens_to_ids("Z")
    always_z = scripted("always_z", {}, z)
    n = 160
    settings = SamplingSettings(max_new_tokens=n, temperature=0, ignore_eos=True)
    # 8 samples of "a" fill the engine; "b" starts only when they are done
    reqs = [GroupRequest("a", "Hello there", 8), GroupRequest("b", "Q: 1+1?", 2)]
    start = time.monotonic()
    baseline = {}
    for group in engine.generate(reqs, settings):
        baseline.update(by_key([group]))
        if group[0].prompt_id == "a":
            a_done = time.monotonic() - start
    for _ in range(3):  # the switch is timed: on a busy machine it may miss the "a" samples
        engine.load_weights(0, tiny_model)
        source = AfterSeconds(1, always_z, delay_s=0.4 * a_done)
        got = by_key(engine.generate(reqs, settings, weights=source))
        if all(0 < got[("a", i)].versions.count(1) < n for i in range(8)):
            break
    assert engine.version == 1 and source.published_at is not None
    for i in range(8):
        c, base = got[("a", i)], baseline[("a", i)]
        assert z not in base.token_ids and c.versions.count(1) > 0, (a_done, c.versions)
        k = c.versions.index(1)
        assert 0 < k < n and c.versions == [0] * k + [1] * (n - k)
        assert c.token_ids[:k] == base.token_ids[:k]  # continued, not restarted
        torch.testing.assert_close(
            torch.tensor(c.logprobs[:k]), torch.tensor(base.logprobs[:k]), atol=1e-4, rtol=0
        )
        assert c.token_ids[k:] == [z] * (n - k)  # what the new weights produce
        assert all(lp > -1e-3 for lp in c.logprobs[k:])
    for i in range(2):
        assert got[("b", i)].versions == [1] * n and got[("b", i)].token_ids == [z] * n


def test_interruption_injects_phrase_and_continues_at_priority_0(engine, scripted, monkeypatch):
    tok = engine.tokenizer
    spawned = []  # (sample, tokens already in the prompt, priority) of every segment
    spawn = engine._spawn

    def recording(request_id, prompt, params, priority, results):
        spawned.append((request_id.rsplit("/", 1)[0], len(prompt["prompt_token_ids"]), priority))
        return spawn(request_id, prompt, params, priority, results)

    monkeypatch.setattr(engine, "_spawn", recording)
    a, end, eos = (tok.convert_tokens_to_ids(t) for t in ("a", "</think>", tok.eos_token))
    engine.load_weights(1, scripted("a_then_eos", {end: eos, eos: eos}, a))
    policy = LengthPolicy.from_tokenizer(
        tok, max_new_tokens=200, thinking_budget_min=4, thinking_budget_max=9, answer_budget=5
    )
    phrase = list(policy.interruption_ids)
    reqs = [GroupRequest(f"p{i}", text, 3) for i, text in enumerate(PROMPTS)]
    groups = list(engine.generate(reqs, SamplingSettings(max_new_tokens=200), length=policy))
    budgets = set()
    for c in (c for g in groups for c in g):
        b = c.token_ids.index(phrase[0])
        budgets.add(b)
        assert 4 <= b <= 9 and c.token_ids == [a] * b + phrase + [eos]
        assert c.text == "a" * b + INTERRUPTION_PHRASE
        assert (c.finish_reason, c.interrupted) == ("interrupted", True)
        assert c.sampled == [True] * b + [False] * len(phrase) + [True]
        assert all(lp > -1e-3 for lp in c.logprobs) and c.versions == [1] * len(c.token_ids)
    assert len(groups) == 4 and len(budgets) > 1
    first: dict[str, int] = {}
    for sample, n, priority in spawned:
        if sample not in first:
            first[sample] = n
            assert priority == 1
        else:
            assert n > first[sample] and priority == 0
    assert len(spawned) == 2 * len(first) == 24


def test_closing_the_generator_aborts_the_sequences_in_flight(engine, scripted):
    tok = engine.tokenizer
    q, a, eos = (tok.convert_tokens_to_ids(t) for t in ("?", "a", tok.eos_token))
    engine.load_weights(1, scripted("eos_after_q", {q: eos, eos: eos}, a))  # "Why?" stops at once
    reqs = [GroupRequest("long", "x", 4), GroupRequest("short", "Why?", 2)]
    stream = engine.generate(reqs, SamplingSettings(max_new_tokens=3000, temperature=0))
    first = next(stream)
    assert [c.token_ids for c in first] == [[eos], [eos]]
    stream.close()  # the 4 "long" samples are still running: aborted, not left behind
    assert engine.engine.output_processor.get_num_unfinished_requests() == 0
    assert not engine._call(_tasks(engine))


async def _tasks(engine):
    return list(engine._tasks)


def test_close_leaves_no_child_process(async_engine, reference):
    """Last in the module: closes the shared engine."""

    def children() -> set[int]:
        """vLLM's engine core and workers (titled VLLM::..., or spawn_main before that).
        (In the whole suite this process has other children too: the session's Prefect and
        S3 servers, the fork server of runtime/isolated.py, reward workers.)"""
        pids = set()
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # gone meanwhile: not a leak
                # multiprocessing's resource tracker lives as long as this process
                line = " ".join(p.cmdline())
                if p.pid != reference.pid and ("VLLM::" in line or "spawn_main" in line):
                    pids.add(p.pid)
        return pids

    before = children()
    assert before, "the engine core and its worker run in child processes"
    async_engine.close()
    assert not children() and not any(psutil.pid_exists(pid) for pid in before)
    assert not async_engine._thread.is_alive()
    async_engine.close()  # twice is fine
    with pytest.raises(Exception, match="closed"):
        next(async_engine.generate([GroupRequest("a", "x", 1)], SamplingSettings(max_new_tokens=2)))


def test_a_missing_model_fails_before_vllm_starts(tmp_path):
    from scalerl.engines.vllm_async import AsyncVLLMEngine
    from scalerl.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist.*Fix"):
        AsyncVLLMEngine(str(tmp_path / "missing"), dtype="float32")
