"""The `scalerl` console script: help, config commands, and exit code 2 with one line on bad input."""

import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
SCRIPT = Path(sys.executable).parent / "scalerl"


def test_console_script_help_runs():
    out = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("config", "runs"):
        assert command in out.stdout


def test_config_show_resolves_preset_and_overrides():
    result = runner.invoke(
        app, ["config", "show", "--preset", "tiny-cpu", "--set", "generation.samples_per_prompt=4"]
    )
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["generation"]["samples_per_prompt"] == 4
    assert shown["model"]["name_or_path"] == "builtin:tiny-warm"


def test_config_validate_bad_input_exits_2_with_one_clear_line():
    result = runner.invoke(app, ["config", "validate", "--set", "pipeline.max_off_policy_steps=-1"])
    assert result.exit_code == 2
    assert "pipeline.max_off_policy_steps = -1" in result.output
    assert "Traceback" not in result.output


def test_config_validate_missing_file(tmp_path):
    result = runner.invoke(app, ["config", "validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_debug_flag_shows_the_exception():
    result = runner.invoke(app, ["--debug", "config", "validate", "--set", "modle.x=1"])
    assert result.exit_code != 0
    assert result.exception is not None


def test_config_schema_is_json_with_every_section():
    import json

    result = runner.invoke(app, ["config", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert {"model", "generation", "algorithm", "pipeline", "storage"} <= set(schema["properties"])


def test_run_with_invalid_parameters_writes_nothing(tmp_path):
    root = tmp_path / "runs"
    result = runner.invoke(
        app,
        [
            "run",
            "--preset",
            "tiny-cpu",
            "--set",
            "pipeline.max_off_policy_steps=-1",
            "--storage",
            str(root),
        ],
    )
    assert result.exit_code == 2
    assert "pipeline.max_off_policy_steps = -1" in result.output
    assert not root.exists()


def test_config_show_prints_a_config_whose_inputs_do_not_exist_yet(tmp_path):
    """show resolves and prints; it does not check the data file, model or storage (validate
    and run do)."""
    missing = tmp_path / "not-yet.jsonl"
    result = runner.invoke(app, ["config", "show", "--set", f"data.source={missing}"])
    assert result.exit_code == 0, result.output
    assert str(missing) in result.output
