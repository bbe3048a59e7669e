"""The package's layout: every import inside fulu_nas (module level and inside functions) forms a
graph without cycles, and the layer library imports nothing above itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import fulu_nas

PACKAGE = Path(fulu_nas.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """The fulu_nas modules and the top-level outside packages that ``name`` imports anywhere in its code."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # ``from pkg import sub`` imports the submodule pkg.sub when there is one.
            subs = {f"{module}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(subs or {module})
    return {m if m in MODULES else m.split(".")[0] for m in found if m.split(".")[0] != "__future__"}


GRAPH = {name: {m for m in _imports(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_package_and_its_imports():
    assert {"fulu_nas.moe.layer", "fulu_nas.search.study", "fulu_nas.bench.cli", "fulu_nas.cli"} <= MODULES.keys()
    assert "fulu_nas.moe.config" in GRAPH["fulu_nas.moe.layer"]
    assert "fulu_nas.moe.triton_moe" in GRAPH["fulu_nas.moe.layer"]  # from . import triton_moe
    assert "fulu_nas.search.app" in GRAPH["fulu_nas.cli"]  # imported inside a function
    # the walker finds a cycle when there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_layer_library_needs_torch_and_the_standard_library_only():
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    for name, path in MODULES.items():
        if name.startswith("fulu_nas.moe"):
            imported = _imports(name, path)
            assert {m for m in imported if m.startswith("fulu_nas") and not m.startswith("fulu_nas.moe")} == set(), name
            assert {m for m in imported if not m.startswith("fulu_nas")} <= allowed, name


# Bottom to top: a module imports modules of its own layer or of layers below it, never above.
# __main__: `python -m fulu_nas`, the command line without the script.
LAYERS = ["errors", "signals", "moe", "checks", "options", "models", "tasks", "training", "deploy", "system",
          "system_config", "interop", "", "search", "bench", "dashboard", "cli", "__main__"]


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 else "")  # "" is the package's __init__ (its public API)


def test_imports_point_down():
    assert {m.split(".")[1] for m in MODULES if "." in m} <= set(LAYERS), "a new layer: place it in LAYERS"
    upward = [f"{name} -> {target}" for name, targets in GRAPH.items() for target in targets
              if _layer(target) > _layer(name)]
    assert upward == []


def test_the_package_loads_its_public_names_on_first_use_with_their_registrations():
    """``import fulu_nas`` (what the console entry point does) loads no torch; the first public name
    read loads the API as a whole, the Hugging Face importer and the upcycle task registered."""
    code = ("import sys, fulu_nas\n"
            "assert 'torch' not in sys.modules\n"
            "from fulu_nas import PiMoELayer\n"
            "from fulu_nas.tasks import TASKS\n"
            "assert PiMoELayer.hf_importer is not None and 'upcycle' in TASKS\n"
            "assert set(fulu_nas.__all__) <= set(dir(fulu_nas))\n"
            "assert all(getattr(fulu_nas, name) is not None for name in fulu_nas.__all__)\n"
            "try:\n"
            "    fulu_nas.no_such_name\n"
            "except AttributeError as e:\n"
            "    assert 'no_such_name' in str(e)\n"
            "else:\n"
            "    raise SystemExit('an unknown name was found')\n")
    in_a_fresh_python(code)


def test_a_task_registered_above_names_its_module_until_it_is_imported():
    """Reading tasks directly (``from fulu_nas.tasks import build_task``) no longer imports the layers
    that register tasks: the upcycle task was then an "unknown task"."""
    code = ("from fulu_nas.errors import FuluConfigError\n"
            "from fulu_nas.tasks import build_task\n"
            "try:\n"
            "    build_task('upcycle')\n"
            "except FuluConfigError as e:\n"
            "    assert \"task 'upcycle' is registered by fulu_nas.interop: import it first\" in str(e), str(e)\n"
            "else:\n"
            "    raise SystemExit('built')\n"
            "import fulu_nas.interop\n"
            "try:\n"
            "    build_task('upcycle')\n"
            "except FuluConfigError as e:\n"
            "    assert 'model not set' in str(e), str(e)\n")
    in_a_fresh_python(code)


def in_a_fresh_python(code: str) -> None:
    """Run ``code`` in a new interpreter (what it imports is not what this test session already has)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
