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
