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
    } <= entrypoints
    for entrypoint in entrypoints:
        path, name = entrypoint.split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(getattr(module, name), "fn"), f"{entrypoint} is not a Prefect flow"
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"scalerl-process"}


def test_tiny_cpu_deployment_parameters_are_the_preset():
    params = _deployments()["scalerl-tiny-cpu"]["parameters"]["config"]
    assert RunConfig.model_validate(params) == load_config(preset="tiny-cpu")
