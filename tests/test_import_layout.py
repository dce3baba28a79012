"""The package's import graph: every module imports alone in a fresh interpreter, and no two modules import each
other, directly or through others, even by a function-local import (only ``if TYPE_CHECKING:`` imports, which never
run, are left out)."""

import ast
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).parents[1]
# import package -> folder, as pyproject.toml maps them
PACKAGES = {"dit_cache": ROOT / "dit_cache", "dit_cache.training": ROOT / "training",
            "dit_cache.pipelines": ROOT / "pipelines"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if not any(name.startswith(f"{other}.") and other != package and other.startswith(f"{package}.")
                       for other in PACKAGES):
                modules[name] = path
    return modules


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports anywhere in its code (the module or package a name comes from)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    resolved = set()
    for target in found:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    return components


def _package_graph() -> dict[str, set[str]]:
    # A package's __init__ re-exports its modules: importing "dit_cache.x" runs dit_cache/__init__ first, which is
    # not a cycle of the code. So edges into a package's own __init__ from inside it are dropped.
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {target for target in _imports(name, path)
                       if not (name.startswith(f"{target}.") and MODULES[target].name == "__init__.py")}
    return graph


def test_the_import_graph_has_no_cycle():
    cycles = _cycles(_package_graph())
    assert not cycles, "import cycles (break them by moving code, not by local imports): " + "; ".join(
        " <-> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_engine_does_not_import_the_tools():
    """The cache engine never imports the benchmark, the CLI, the toy world, training or the pipelines."""
    engine = ["dit_cache.cache", "dit_cache.hooks", "dit_cache.plan", "dit_cache.schedule", "dit_cache.forecast",
              "dit_cache.router", "dit_cache.units", "dit_cache.flops", "dit_cache.compile", "dit_cache.families"]
    graph = _package_graph()
    reachable, todo = set(), [m for m in engine if m in graph]
    while todo:
        module = todo.pop()
        for target in graph[module] - reachable:
            reachable.add(target)
            todo.append(target)
    tools = {m for m in reachable if m.startswith(("dit_cache.bench", "dit_cache.cli", "dit_cache.toy",
                                                   "dit_cache.training", "dit_cache.pipelines", "dit_cache.bench.peer_bench",
                                                   "dit_cache.bench.peers", "dit_cache.toy.shapes", "dit_cache.toy.evaluation"))}
    assert not tools


# One interpreter loads the third-party libraries once, then forks a child per module, which imports that module
# with none of the package loaded before it: each module imports alone, without paying torch's import 60 times.
_IMPORT_EACH = """
import os, sys, traceback
import torch, diffusers, transformers, lightning, safetensors, numpy  # noqa: F401
assert not any(name == "dit_cache" or name.startswith("dit_cache.") for name in sys.modules)
failures = []
for name in sys.argv[1:]:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            __import__(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc()[-800:].encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        error = pipe.read()
    if os.waitpid(child, 0)[1]:
        failures.append(name + ": " + error)
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *sorted(MODULES)], capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            cwd="/", timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_a_module_that_fails_to_import_is_reported():
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, "dit_cache.no_such_module"], capture_output=True,
                            text=True, cwd="/", timeout=600)
    assert result.returncode == 1 and "dit_cache.no_such_module" in result.stdout
