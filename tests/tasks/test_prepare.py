"""prepare_run checks its inputs before it creates anything, and does not retry bad input."""

import pytest
from prefect import flow

import scalerl.data
from scalerl.config import load_config
from scalerl.data import DataError
from tasks.prepare import prepare_run


def test_bad_data_fails_once_and_writes_nothing(prefect_harness, tmp_path, monkeypatch):
    calls = []

    def bad_prompts(_data):
        calls.append(1)
        raise DataError("data file /nope.jsonl does not exist. Fix: point data.source at it.")

    monkeypatch.setattr(scalerl.data, "load_prompts", bad_prompts)
    root = tmp_path / "runs"
    cfg = load_config(preset="tiny-cpu", overrides=[f"storage.url={root}"])

    @flow
    def just_prepare():
        return prepare_run(cfg, "r1")

    with pytest.raises(DataError, match="does not exist"):
        just_prepare()
    assert calls == [1]  # retries=2 would have called it 3 times
    assert not (root / "r1").exists()


def test_missing_local_model_fails_before_the_run_exists(prefect_harness, tmp_path):
    root = tmp_path / "runs"
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[f"storage.url={root}", f"model.name_or_path={tmp_path / 'no-model'}"],
    )

    @flow
    def just_prepare():
        return prepare_run(cfg, "r2")

    with pytest.raises(ValueError, match="Fix:"):
        just_prepare()
    assert not (root / "r2").exists()


def test_another_config_under_an_existing_run_id_names_the_fields_and_is_not_retried(
    prefect_harness, tmp_path, monkeypatch
):
    from runtime.common import with_run_id
    from storage import open_store
    from storage.errors import ConfigMismatchError

    root = tmp_path / "runs"
    base = with_run_id(
        load_config(
            preset="tiny-cpu", overrides=[f"storage.url={root}", "model.name_or_path=builtin:tiny"]
        ),
        "r3",
    )
    other = base.model_copy(
        update={
            "schedule": base.schedule.model_copy(update={"max_steps": 7}),
            "optimizer": base.optimizer.model_copy(update={"lr": 0.5}),
        }
    )
    writes = []
    real_write = type(open_store(str(root)).run("x", create=True)).write_config

    def counting_write(self, config, **kw):
        writes.append(1)
        return real_write(self, config, **kw)

    @flow
    def just_prepare(cfg):
        return prepare_run(cfg, "r3")

    assert just_prepare(base) == "r3"
    saved = open_store(str(root)).run("r3").read_config()
    monkeypatch.setattr(type(open_store(str(root)).run("r3")), "write_config", counting_write)
    with pytest.raises(ConfigMismatchError) as err:
        just_prepare(other)
    assert writes == [1]  # retries=2 would have tried 3 times
    message = str(err.value)
    assert "optimizer.lr: 0.00015 in run.json, 0.5 given" in message
    assert "schedule.max_steps: 500 in run.json, 7 given" in message
    assert "scalerl resume r3" in message
    assert open_store(str(root)).run("r3").read_config() == saved


def test_changed_shipped_warm_weights_fail_before_the_run_exists(
    prefect_harness, tmp_path, monkeypatch
):
    import shutil

    import scalerl.warmstart
    from scalerl.warmstart import SHIPPED_DIR, ShippedWeightsError

    copy = tmp_path / "tiny-warm"
    shutil.copytree(SHIPPED_DIR, copy)
    (copy / "config.json").write_text("{}")  # an edited file
    monkeypatch.setattr(scalerl.warmstart, "SHIPPED_DIR", copy)
    root = tmp_path / "runs"
    cfg = load_config(preset="tiny-cpu", overrides=[f"storage.url={root}"])

    @flow
    def just_prepare():
        return prepare_run(cfg, "r1")

    with pytest.raises(ShippedWeightsError, match="config.json does not match its manifest"):
        just_prepare()
    assert not (root / "r1").exists()


def test_a_lora_run_gets_version_zero_once_and_a_resume_builds_no_base(
    prefect_harness, tmp_path, monkeypatch
):
    """model.lora: prepare publishes version 0 (the base with the initial adapter beside it,
    the RMSNorms' base values in it); preparing the run again (a resume) checks the adapters on
    the meta device and builds no base model."""
    import json

    import runtime.common
    import tasks.prepare
    from storage import open_store

    root = tmp_path / "runs"
    cfg = load_config(
        preset="tiny-cpu",
        overrides=[
            f"storage.url={root}",
            "storage.run_id=lora",
            "model.name_or_path=builtin:tiny",
            "data.source=synthetic:arithmetic",
            "model.lora.rank=4",
            "model.lora.trained_modules=[norm]",
        ],
    )
    built = []
    real = runtime.common.materialize_base_model

    def counted(config, out_dir):
        built.append(out_dir)
        return real(config, out_dir)

    monkeypatch.setattr(tasks.prepare, "materialize_base_model", counted)

    @flow
    def just_prepare():
        return prepare_run(cfg, "lora")

    assert just_prepare() == "lora" and len(built) == 1
    v0 = open_store(str(root)).run("lora").download_weights(0, tmp_path / "v0")
    assert (v0 / "config.json").is_file() and (v0 / "model.safetensors").is_file()
    adapter = json.loads((v0 / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["modules_to_save"] == ["norm"]
    assert just_prepare() == "lora" and len(built) == 1  # the resume: nothing rebuilt
