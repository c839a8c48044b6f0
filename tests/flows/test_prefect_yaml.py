"""prefect.yaml: one deployment per flow entrypoint, on the process pool, and the tiny-cpu
deployment's parameters are exactly the tiny-cpu preset (so the UI run and `make demo` agree)."""

import importlib
from pathlib import Path

import yaml

from scalerl.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def _deployments():
    return {
        d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    }


def test_every_flow_file_has_a_deployment_whose_entrypoint_imports():
    deployments = _deployments()
    entrypoints = {d["entrypoint"] for d in deployments.values()}
    assert {
        "flows/run.py:scalerl_run",
        "flows/generate.py:scalerl_generate",
        "flows/evaluate.py:scalerl_evaluate",
        "flows/fit_curve.py:scalerl_fit_curve",
        "flows/resume.py:scalerl_resume",
    } <= entrypoints
    for entrypoint in entrypoints:
        path, name = entrypoint.split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(getattr(module, name), "fn"), f"{entrypoint} is not a Prefect flow"
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"scalerl-process"}


def test_tiny_cpu_deployment_parameters_are_the_preset():
    params = _deployments()["scalerl-tiny-cpu"]["parameters"]["config"]
    assert RunConfig.model_validate(params) == load_config(preset="tiny-cpu")


def _run_form():
    """The parameter schema the Prefect UI builds the run form from (what `prefect deploy` sends)."""
    from prefect.utilities.callables import parameter_schema

    from flows.run import scalerl_run

    return parameter_schema(scalerl_run.fn).model_dump()


def test_the_run_form_has_one_run_id_field():
    form = _run_form()
    assert list(form["properties"]) == ["config"]  # no second, top-level run_id
    storage = form["definitions"]["StorageConfig"]["properties"]
    assert "Retry" in storage["run_id"]["description"]
    assert "working directory" in storage["url"]["description"]  # what ./runs resolves against


def test_the_loss_is_a_choice_of_types_the_ui_form_can_render():
    """The Prefect 3.6 UI form renders anyOf / allOf properties as a choice with each option's
    fields; a oneOf property (pydantic's discriminated union) became an empty JSON editor."""
    form = _run_form()
    loss = form["definitions"]["AlgorithmConfig"]["properties"]["loss"]
    assert "oneOf" not in loss and "discriminator" not in loss
    refs = [option["$ref"].rsplit("/", 1)[-1] for option in loss["anyOf"]]
    assert refs == ["CISPOLoss", "GRPOLoss", "DAPOLoss", "GSPOLoss"]
    assert loss["default"] == {"type": "cispo", "eps_max": 4.0}
    for ref in refs:  # each option names its type and carries its own fields with bounds
        option = form["definitions"][ref]
        assert option["properties"]["type"]["const"] == ref.removesuffix("Loss").lower()
        assert len(option["properties"]) >= 2
    # validation is still the discriminated union
    assert RunConfig.model_validate(
        {"algorithm": {"loss": {"type": "dapo"}}}
    ).algorithm.loss.type == ("dapo")
