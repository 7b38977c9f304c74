"""The import structure: no import cycles within se_engine and triton_kernels, the kernels independent
of the engine, and Triton loaded only when a fused kernel runs."""

import ast
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

PACKAGES = ("se_engine", "triton_kernels")


def modules() -> dict[str, Path]:
    """Every module of PACKAGES (packages as their __init__.py, the compiled extension too) -> its file."""
    found = {}
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        found[package] = Path(spec.origin)
        for info in pkgutil.walk_packages(spec.submodule_search_locations, prefix=package + "."):
            found[info.name] = Path(importlib.util.find_spec(info.name).origin)
    return found


def module_level(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported: at top level or in top-level if / try /
    with blocks, not in function or class bodies."""
    imports, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            todo.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)
    return imports


def imported_from(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module a ``from ... import`` statement of ``package`` names."""
    if not node.level:
        return node.module
    base = package
    for _ in range(node.level - 1):  # each further dot: one package up
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of PACKAGES it imports at module level (none for the compiled extension)."""
    files = modules()
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        if path.suffix != ".py":
            graph[name] = targets
            continue
        for node in module_level(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = imported_from(node, package)
            # ``from pkg import sub`` imports the submodule sub; only a name that is no submodule is
            # taken from pkg itself (the parent packages are imported first either way, not counted).
            subs = {f"{base}.{alias.name}" for alias in node.names} & set(files)
            targets |= subs
            if len(subs) < len(node.names):
                targets.add(base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert {"se_engine.decode", "se_engine.packing", "triton_kernels.verify"} <= set(graph)
    assert "se_engine.packing" in graph["se_engine.cuda_graphs"]  # relative imports resolve
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_import_nothing_of_the_engine():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("triton_kernels"):
            assert not {t for t in targets if t.startswith("se_engine")}, name


def test_importing_the_engine_leaves_triton_unloaded():
    """Triton (its start-up cost, or its absence) matters only where a fused kernel runs."""
    code = "import sys, se_engine, se_engine.engine; assert 'triton' not in sys.modules, 'triton imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
