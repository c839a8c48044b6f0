"""`pytest -m gpu` on a machine with only what the GPU tests need (tests/conftest.py): the
stock GPU image has no Prefect, duckdb, hypothesis or vLLM and no pytest-timeout, while
pyproject's addopts pass --timeout. Simulated in a subprocess: no plugin autoloading (so no
pytest-timeout), and a -p plugin that makes the packages below look not installed (None in
sys.modules: import raises ModuleNotFoundError, importlib.util.find_spec returns None)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("prefect", "duckdb", "hypothesis", "scipy", "matplotlib", "moto", "vllm")
BLOCKER = '''"""-p plugin: the packages in SCALERL_BLOCKED are not installed, as far as imports see."""
import os
import sys

for name in os.environ["SCALERL_BLOCKED"].split(","):
    sys.modules[name] = None
'''


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "scalerl_block_imports.py").write_text(BLOCKER)
    path = [str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        "SCALERL_BLOCKED": ",".join(BLOCKED),
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
    }
    cmd = [sys.executable, "-m", "pytest", "-p", "scalerl_block_imports", "-p", "no:cacheprovider"]
    return subprocess.run(
        [*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_gpu_tests_collect_without_the_dev_dependencies(tmp_path):
    out = _pytest(tmp_path, "-m", "gpu", "--collect-only", "-q", "-rs", "tests/scalerl")
    text = out.stdout + out.stderr
    assert out.returncode in (0, 5), text[-3000:]
    assert "ERROR" not in text and "during collection" not in text, text[-3000:]
    # the modules that need a blocked package are skipped with it named ...
    assert "not installed: import of hypothesis halted" in text, text[-3000:]
    assert "not installed: import of matplotlib halted" in text, text[-3000:]
    # ... and the gpu tests that need none of them are still collected
    assert "tests/scalerl/trainer/test_cuda.py::" in text, text[-3000:]


def test_a_run_that_is_not_gpu_only_still_fails_on_a_missing_package(tmp_path):
    """The CI suite is unchanged: a module that cannot be imported is a collection error."""
    out = _pytest(tmp_path, "-m", "not gpu", "--collect-only", "-q", "tests/scalerl/test_plots.py")
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "import of matplotlib halted" in text and "1 error" in text, text[-3000:]
