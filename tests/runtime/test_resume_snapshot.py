"""A run prepared before the weights section became one variant per transport (its run.json holds
local_dir, durable_every and nccl_address whatever the transport) resumes as the same run: the
snapshot is rewritten in the current form with the same values, and the run accepts it."""

import pytest

from runtime.common import resume_config
from scalerl.config import load_config
from storage import open_store

OLD_FIELDS = {"local_dir": None, "durable_every": 10, "nccl_address": None}


@pytest.mark.parametrize(
    ("transport", "expected"),
    [
        ("store", {}),
        ("local", {"local_dir": None, "durable_every": 10}),
    ],
)
def test_a_run_json_from_before_the_variants_resumes_as_the_same_run(tmp_path, transport, expected):
    root = str(tmp_path / "runs")
    snapshot = load_config(preset="tiny-cpu").model_dump(mode="json")
    snapshot["weights"] = {**snapshot["weights"], **OLD_FIELDS, "transport": transport}
    snapshot["storage"] = {**snapshot["storage"], "url": root, "run_id": "old"}
    run = open_store(root).run("old", create=True)
    run.write_config(snapshot)

    config, _ = resume_config("old", root)

    assert config.weights.transport == transport
    for key, value in expected.items():
        assert getattr(config.weights, key) == value
    rewritten = run.read_config()
    assert rewritten == config.model_dump(mode="json")
    for key in OLD_FIELDS.keys() - expected.keys():
        assert key not in rewritten["weights"]
    # every other section of the snapshot is unchanged
    assert {k: v for k, v in rewritten.items() if k != "weights"} == {
        k: v for k, v in snapshot.items() if k != "weights"
    }
    run.check_config(config.model_dump(mode="json"))  # what prepare_run's write then accepts


def test_durable_every_of_a_store_run_is_dropped_whatever_its_value(tmp_path):
    """It never did anything with transport store (every version is durable there), so an old
    snapshot may hold any value of it."""
    root = str(tmp_path / "runs")
    snapshot = load_config(preset="tiny-cpu").model_dump(mode="json")
    snapshot["weights"] = {**snapshot["weights"], **OLD_FIELDS, "durable_every": 3}
    snapshot["storage"] = {**snapshot["storage"], "url": root, "run_id": "old"}
    open_store(root).run("old", create=True).write_config(snapshot)

    config, _ = resume_config("old", root)

    assert (
        config.weights.transport == "store" and "durable_every" not in config.weights.model_fields
    )


def test_a_finished_runs_snapshot_is_left_as_it_is(tmp_path):
    root = str(tmp_path / "runs")
    snapshot = load_config(preset="tiny-cpu").model_dump(mode="json")
    snapshot["weights"] = {**snapshot["weights"], **OLD_FIELDS}
    snapshot["storage"] = {**snapshot["storage"], "url": root, "run_id": "done"}
    run = open_store(root).run("done", create=True)
    run.write_config(snapshot)
    run.write_status({"state": "finished"})

    config, status = resume_config("done", root)

    assert status["state"] == "finished" and config.weights.transport == "store"
    assert run.read_config() == snapshot
