"""Imports run one way: flows -> tasks -> (scalerl, storage). Checked on the source (AST) and at runtime."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "scalerl": {"prefect", "fsspec", "s3fs", "storage", "tasks", "flows", "vllm"},
    "storage": {"torch", "prefect", "scalerl", "tasks", "flows", "transformers", "vllm"},
    "tasks": {"flows"},
}
# vLLM is imported lazily inside the vLLM engine only.
ALLOWED = {("scalerl/engines/vllm_engine.py", "vllm"), ("scalerl/engines/vllm_async.py", "vllm")}


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0], node.lineno


def _python(code: str, timeout: int):
    """Run `code` in a fresh interpreter at the repository root; its completed process."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_no_forbidden_imports_in_source():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for module, line in _imports(path):
                if module in forbidden and (rel, module) not in ALLOWED:
                    bad.append(f"{rel}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_importing_every_scalerl_module_pulls_no_orchestration_or_storage():
    code = (
        "import importlib, pkgutil, sys, scalerl\n"
        "for m in pkgutil.walk_packages(scalerl.__path__, 'scalerl.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in ('prefect', 'vllm', 'storage', 'tasks', 'flows', 's3fs') if n in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = _python(code, timeout=300)
    assert out.stdout.strip() == "", f"scalerl pulled in: {out.stdout.strip()}"


def test_importing_storage_pulls_no_torch():
    code = "import sys, storage\nprint(','.join(n for n in ('torch', 'prefect', 'scalerl') if n in sys.modules))\n"
    out = _python(code, timeout=120)
    assert out.stdout.strip() == ""


def test_the_flow_process_prepares_a_tiny_warm_run_without_importing_torch(tmp_path):
    """The run flow's own process (prepare: prompts, weights v0 from the cached warm model,
    curriculum v0) imports neither torch nor transformers: only the generator, trainer and
    evaluation processes do (importing torch took ~2.6 s of the flow's start on 2 cores)."""
    from scalerl.config import load_config
    from tasks.common import materialize_base_model

    cfg = load_config(preset="tiny-cpu")
    materialize_base_model(cfg, tmp_path / "warm")  # builds the cache if this machine lacks it
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import flows.run\n"
        "from scalerl.config import load_config\n"
        "from scalerl.curriculum import NoPositiveResampling\n"
        "from scalerl.data import load_prompts\n"
        "from tasks.common import materialize_base_model\n"
        "cfg = load_config(preset='tiny-cpu')\n"
        "prompts = load_prompts(cfg.data)\n"
        "NoPositiveResampling([r['prompt_id'] for r in prompts.train]).state_dict()\n"
        f"out = materialize_base_model(cfg, Path({str(tmp_path / 'v0')!r}))\n"
        "assert (out / 'config.json').is_file()\n"
        "print(','.join(n for n in ('torch', 'transformers') if n in sys.modules))\n"
    )
    out = _python(code, timeout=300)
    assert out.stdout.strip() == "", f"the flow process imported: {out.stdout.strip()}"
