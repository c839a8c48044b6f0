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
