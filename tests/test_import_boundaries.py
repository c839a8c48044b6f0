"""Imports run one way: flows -> tasks -> runtime -> (scalerl, storage), with no circle anywhere.
Checked on the source (AST: module-level and function-local imports alike) and at runtime."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "scalerl": {"prefect", "fsspec", "s3fs", "storage", "runtime", "tasks", "flows", "vllm"},
    "storage": {"torch", "prefect", "scalerl", "runtime", "tasks", "flows", "transformers", "vllm"},
    # the runtime layer: the pipeline's machinery without Prefect (tasks/ wraps it)
    "runtime": {"prefect", "tasks", "flows"},
    "tasks": {"flows"},
}
PACKAGES = ("scalerl", "storage", "runtime", "tasks", "flows")
# vLLM is imported lazily inside the vLLM engine only.
ALLOWED = {
    ("scalerl/engines/vllm_engine.py", "vllm"),
    ("scalerl/engines/vllm_async.py", "vllm"),
    ("scalerl/engines/vllm_common.py", "vllm"),
}


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0], node.lineno


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports, anywhere in its source (a function-local
    import is as much a dependency as a module-level one: it only hides the circle)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                found.update(resolve(f"{base}.{a.name}") or resolve(base) for a in node.names)
        graph[name] = {m for m in found if m and m != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_the_projects_modules():
    graph = import_graph()
    assert "runtime.generator" in graph and "runtime.common" in graph["runtime.generator"]
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_runtime_layer_imports_no_prefect_at_runtime():
    code = (
        "import importlib, pkgutil, sys, runtime\n"
        "for m in pkgutil.walk_packages(runtime.__path__, 'runtime.'):\n"
        "    if m.name not in ('runtime.preload',):  # the fork server's (imports torch)\n"
        "        importlib.import_module(m.name)\n"
        "print(','.join(n for n in ('prefect', 'tasks', 'flows') if n in sys.modules))\n"
    )
    out = _python(code, timeout=300)
    assert out.stdout.strip() == "", f"the runtime layer pulled in: {out.stdout.strip()}"


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
        "bad = sorted(n for n in ('prefect', 'vllm', 'storage', 'runtime', 'tasks', 'flows', 's3fs') if n in sys.modules)\n"
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
    from runtime.common import materialize_base_model
    from scalerl.config import load_config

    cfg = load_config(preset="tiny-cpu")
    materialize_base_model(cfg, tmp_path / "warm")  # builds the cache if this machine lacks it
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import flows.run\n"
        "from scalerl.config import load_config\n"
        "from scalerl.curriculum import NoPositiveResampling\n"
        "from scalerl.data import load_prompts\n"
        "from runtime.common import materialize_base_model\n"
        "cfg = load_config(preset='tiny-cpu')\n"
        "prompts = load_prompts(cfg.data)\n"
        "NoPositiveResampling([r['prompt_id'] for r in prompts.train]).state_dict()\n"
        f"out = materialize_base_model(cfg, Path({str(tmp_path / 'v0')!r}))\n"
        "assert (out / 'config.json').is_file()\n"
        "print(','.join(n for n in ('torch', 'transformers') if n in sys.modules))\n"
    )
    out = _python(code, timeout=300)
    assert out.stdout.strip() == "", f"the flow process imported: {out.stdout.strip()}"
