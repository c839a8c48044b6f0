"""`scalerl plan` without network: a hub model's config.json is read from the local Hugging Face
cache (HF_HOME / HF_HUB_CACHE, at the configured revision) before anything could reach the hub;
KNOWN_CONFIGS is the fallback; a model in neither gets one line saying what to download.

Every test runs with HF_HUB_OFFLINE=1 and a cache built in a temporary directory in the hub's
own layout (models--Org--Name/refs/<branch>, snapshots/<commit>/config.json). The cached shape
is one that KNOWN_CONFIGS does not hold, so the numbers can only come from the cache; they are
checked against the Qwen3 parameter count written out below."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from scalerl.models import ModelLoadError
from scalerl.placement import GIB, KNOWN_CONFIGS, VLLM_RESERVE_BYTES, model_shape

runner = CliRunner()
REPO = "TestOrg/qwen3-plan-shape"
MAIN_SHA = "1" * 40
OTHER_SHA = "2" * 40
SHAPE = dict(hidden=256, intermediate=768, layers=3, heads=4, kv_heads=2, head_dim=64, vocab=1000)


def qwen3_params(hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied) -> int:
    """Qwen3: embeddings, per layer q/k/v/o without biases, q/k RMSNorms over head_dim, a SwiGLU
    MLP (gate, up, down) and two RMSNorms; a final RMSNorm; an untied head of vocab x hidden."""
    attn = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    layer = attn + 2 * head_dim + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden + layers * layer + hidden + (0 if tied else vocab * hidden)


def qwen3_config_json(layers: int) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": SHAPE["hidden"],
        "intermediate_size": SHAPE["intermediate"],
        "num_hidden_layers": layers,
        "num_attention_heads": SHAPE["heads"],
        "num_key_value_heads": SHAPE["kv_heads"],
        "head_dim": SHAPE["head_dim"],
        "vocab_size": SHAPE["vocab"],
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
    }


def add_to_cache(hub, repo: str, sha: str, config: dict, branch: str | None = "main") -> None:
    """What `hf download REPO config.json` leaves in a hub cache (the file itself, not a link)."""
    root = hub / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if branch is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / branch).write_text(sha, encoding="utf-8")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache under HF_HOME, with the hub unreachable."""
    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


def test_the_cached_shape_is_not_a_known_one():
    assert REPO not in KNOWN_CONFIGS


def test_model_shape_reads_the_cached_config(hub):
    add_to_cache(hub, REPO, MAIN_SHA, qwen3_config_json(layers=3))
    shape = model_shape(REPO)
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads) == (256, 3, 4, 2)
    assert (shape.head_dim, shape.vocab, shape.intermediate, shape.tied) == (64, 1000, 768, False)
    assert shape.params == qwen3_params(**SHAPE, tied=False)


def test_model_shape_reads_the_configured_revision(hub):
    add_to_cache(hub, REPO, MAIN_SHA, qwen3_config_json(layers=3))
    add_to_cache(hub, REPO, OTHER_SHA, qwen3_config_json(layers=5), branch="v2")
    assert model_shape(REPO).layers == 3
    assert model_shape(REPO, revision=OTHER_SHA).layers == 5  # a commit: its snapshot
    assert model_shape(REPO, revision="v2").layers == 5  # a branch: refs/v2
    five = dict(SHAPE, layers=5)
    assert model_shape(REPO, revision="v2").params == qwen3_params(**five, tied=False)


def test_hf_hub_cache_is_honoured_over_hf_home(hub, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    add_to_cache(elsewhere, REPO, MAIN_SHA, qwen3_config_json(layers=3))
    monkeypatch.setenv("HF_HUB_CACHE", str(elsewhere))
    assert model_shape(REPO).layers == 3


def test_plan_cli_reads_the_cached_config(hub):
    add_to_cache(hub, REPO, MAIN_SHA, qwen3_config_json(layers=3))
    result = runner.invoke(
        app,
        ["plan", "configs/qwen3-0.6b-math.yaml", "--set", f"model.name_or_path={REPO}", "--json"],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    params = qwen3_params(**SHAPE, tied=False)
    assert plan["shape"]["params"] == params
    assert plan["shape"]["layers"] == 3 and plan["shape"]["hidden"] == 256
    # the KV cache an engine holds, by the arithmetic of the plan: 0.7 of 80 GiB less the bf16
    # weights and vLLM's reserve, over K and V of every layer's KV heads in bf16
    kv_per_token = 2 * 3 * 2 * 64 * 2
    assert plan["kv_tokens_per_engine"] == int(
        (0.7 * 80 * GIB - params * 2 - VLLM_RESERVE_BYTES) // kv_per_token
    )


@pytest.mark.parametrize("revision", [None, "v9"])
def test_an_uncached_unknown_model_says_what_to_download(hub, revision):
    with pytest.raises(ModelLoadError) as err:
        model_shape("TestOrg/not-cached", revision=revision)
    msg = str(err.value)
    assert "\n" not in msg and "Fix:" in msg
    assert str(hub) in msg  # the cache that was looked in
    want = "hf download TestOrg/not-cached config.json" + (
        f" --revision {revision}" if revision else ""
    )
    assert f"`{want}`" in msg


def test_a_branch_not_cached_is_not_read_from_main(hub):
    add_to_cache(hub, REPO, MAIN_SHA, qwen3_config_json(layers=3))
    with pytest.raises(ModelLoadError, match="--revision v3"):
        model_shape(REPO, revision="v3")


def test_plan_cli_refuses_an_uncached_unknown_model_in_one_line(hub):
    result = runner.invoke(
        app,
        [
            "plan",
            "configs/qwen3-0.6b-math.yaml",
            "--set",
            "model.name_or_path=TestOrg/not-cached",
        ],
    )
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert (
        lines[0].startswith("error: ")
        and "`hf download TestOrg/not-cached config.json`" in lines[0]
    )


@pytest.mark.parametrize(
    ("name", "args", "non_embedding"),
    [
        # Qwen3-1.7B / 4B model cards: 1.7B (1.4B non-embedding), 4.0B (3.6B non-embedding)
        ("Qwen/Qwen3-1.7B", (2048, 6144, 28, 16, 8, 128, 151936), 1.4e9),
        ("Qwen/Qwen3-4B", (2560, 9728, 36, 32, 8, 128, 151936), 3.6e9),
    ],
)
def test_known_qwen3_shapes_are_the_offline_fallback(hub, name, args, non_embedding):
    shape = model_shape(name)  # the cache is empty: KNOWN_CONFIGS
    assert shape.params == qwen3_params(*args, tied=True)
    assert abs((shape.params - args[-1] * args[0]) - non_embedding) / non_embedding < 0.02
