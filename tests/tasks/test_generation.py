"""runtime/generation.py's engine factory (one table of engines, what make_engine passes), and
StoreWeights (runtime/transports/store.py), which hands the generator the newest published
version and keeps one local copy."""

import inspect
from typing import get_args

import pytest

from runtime.common import WeightCache
from runtime.generation import ENGINES, EngineKind, engine_kind, make_engine
from runtime.transports.store import StoreWeights
from scalerl.config import GenerationConfig, load_config
from scalerl.engines.hf import TransformersEngine
from storage import open_store


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from scalerl.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def test_poll_returns_the_newest_version_and_deletes_older_local_copies(tmp_path):
    run = open_store(str(tmp_path / "runs")).run("w", create=True)
    for v in range(3):
        d = tmp_path / f"src{v}"
        d.mkdir()
        (d / "config.json").write_text(f'{{"v": {v}}}')
        run.publish_weights(v, d)
    cache = WeightCache(run, tmp_path / "local")
    cache.path(0)
    source = StoreWeights(cache, current=0)
    version, path = source.poll()
    assert version == 2 and (path / "config.json").read_text() == '{"v": 2}'
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["v2"]
    assert source.poll() is None  # nothing newer


def test_the_engine_table_covers_every_engine_the_config_accepts():
    accepted = set(get_args(GenerationConfig.model_fields["engine"].annotation))
    assert set(ENGINES) == accepted
    assert all(kind.name == name for name, (_, kind) in ENGINES.items())


@pytest.mark.parametrize(
    ("engine", "module", "cls"),
    [
        ("vllm", "scalerl.engines.vllm_engine", "VLLMEngine"),
        ("vllm-async", "scalerl.engines.vllm_async", "AsyncVLLMEngine"),
    ],
)
def test_make_engine_builds_the_configured_vllm_engine(monkeypatch, engine, module, cls):
    """What make_engine passes is accepted by the engine's constructor (no vLLM started)."""
    import importlib

    real = getattr(importlib.import_module(module), cls)
    built = []

    def record(path, **kwargs):
        inspect.signature(real).bind(path, **kwargs)
        built.append((path, kwargs))
        return "engine"

    monkeypatch.setattr(f"{module}.{cls}", record)
    config = load_config(
        preset="tiny-cpu", overrides=["model.name_or_path=/m", f"generation.engine={engine}"]
    )
    assert make_engine(config, "/w/v3", 3) == "engine"
    ((path, kwargs),) = built
    assert path == "/w/v3" and kwargs["version"] == 3 and kwargs["seed"] == config.generation.seed
    assert engine_kind(config).one_per_process and not engine_kind(config).cpu_parallel_evaluations


def test_make_engine_builds_the_transformers_engine(tiny_model):
    config = load_config(
        preset="tiny-cpu",
        overrides=[f"model.name_or_path={tiny_model}", "generation.max_batch_size=3"],
    )
    engine = make_engine(config, tiny_model, 2)
    assert isinstance(engine, TransformersEngine)
    assert (engine.version, engine.max_batch_size, engine.fp32_head) == (2, 3, True)
    assert engine_kind(config) == EngineKind("transformers", False, True)


@pytest.mark.parametrize(
    ("placement", "detected", "device"),
    [
        ("placement.accelerator=cuda", None, "cuda:0"),
        ("placement.accelerator=auto", "cuda", "cuda:0"),  # nvidia-smi found a GPU (faked)
        ("placement.accelerator=auto", "cpu", "cpu"),
        ("placement.accelerator=cpu", None, "cpu"),
    ],
)
def test_make_engine_puts_the_transformers_engine_on_the_runs_accelerator(
    monkeypatch, placement, detected, device
):
    """TransformersEngine defaults to the CPU: on cuda make_engine must ask for the process's
    first visible device (its CUDA_VISIBLE_DEVICES holds only its own), or generation and
    evaluation silently run on the CPU. The constructor is recorded, no model is built."""
    import runtime.common

    built = []

    def record(path, **kwargs):
        inspect.signature(TransformersEngine).bind(path, **kwargs)
        built.append(kwargs)
        return "engine"

    monkeypatch.setattr("scalerl.engines.hf.TransformersEngine", record)
    if detected is not None:
        monkeypatch.setattr(runtime.common, "_detected_accelerator", lambda: detected)
    config = load_config(preset="tiny-cpu", overrides=["model.name_or_path=/m", placement])
    assert config.generation.engine == "transformers"
    assert make_engine(config, "/w/v1", 1) == "engine"
    (kwargs,) = built
    assert kwargs["device"] == device and kwargs["version"] == 1
