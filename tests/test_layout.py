"""The package's shape: no import cycles, shared packages never import a stage, small modules.

The import graph is read with ``ast`` (nothing is imported), so a cycle that only shows up on
some code path still fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zorefine"
STAGES = ("align", "analyze", "refine", "evaluate")
# The only modules that may import a stage package: the pipeline that runs them and the CLI.
STAGE_IMPORTERS = {"zorefine.pipeline", "zorefine.cli", "zorefine.__main__"}
MAX_MODULE_LINES = 400


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the zorefine modules it imports (a package's ``__init__`` importing its own
    submodules is a re-export, not a dependency of the package on itself)."""
    paths = {module_name(p, root): p for p in root.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(kept + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                target = resolve(name)
                if target is None or target == module:
                    continue
                if path.name == "__init__.py" and target.startswith(module + "."):
                    continue
                targets.add(target)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    package = tmp_path / "zorefine"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from zorefine.sub import a\n")  # a re-export: no edge
    (package / "sub" / "a.py").write_text("from zorefine.b import thing\n")
    (package / "b.py").write_text("import zorefine.sub.a\n")
    graph = import_graph(package)
    assert graph["zorefine.sub"] == set()
    assert find_cycle(graph) == ["zorefine.b", "zorefine.sub.a", "zorefine.b"]
    (package / "b.py").write_text("thing = 1\n")
    assert find_cycle(import_graph(package)) is None


def test_zorefine_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_shared_packages_never_import_a_stage():
    graph = import_graph()
    offenders = []
    for module, targets in graph.items():
        own_stage = next((s for s in STAGES if module.startswith(f"zorefine.{s}")), None)
        for target in targets:
            stage = next((s for s in STAGES if target == f"zorefine.{s}" or target.startswith(f"zorefine.{s}.")), None)
            if stage is None or stage == own_stage or module in STAGE_IMPORTERS:
                continue
            offenders.append(f"{module} imports {target}")
    assert not offenders, "a stage is imported outside the pipeline: " + "; ".join(sorted(offenders))


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_is_a_package_with_an_entry(stage):
    assert (PACKAGE / stage / "__init__.py").is_file()
    tree = ast.parse((PACKAGE / stage / "stage.py").read_text(encoding="utf-8"))
    assert "run" in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_no_module_is_over_the_size_limit():
    sizes = {module_name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    big = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
