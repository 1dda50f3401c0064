"""The import graph of ``outreach/`` and ``workers/``: which modules import which, function-level imports included.

Imports under ``if TYPE_CHECKING:`` are left out: they never run. The graph's strongly connected components are
its import cycles, and there are none: the broker never imports the actors (the worker entry point declares
them), enrollment and the scheduler both ask :mod:`outreach.pipeline.timing` when a step is due.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("outreach", "workers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            yield from (name for child in node.orelse for name in _imports(child, module, is_package))
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from package import name``: the submodule when ``name`` is one, else the package (resolved later).
            yield from (f"{base}.{alias.name}" for alias in node.names)
        yield from _imports(node, module, is_package)


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (a ``from package import name`` counts as the submodule when
    ``name`` is one)."""
    paths = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    modules = {module_name(path): path for path in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = set()
        for imported in _imports(tree, name, path.name == "__init__.py"):
            while imported and imported not in modules:  # a name in a module: the module
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_the_cycle_finder_finds_a_cycle_and_nothing_else() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]


def test_relative_and_function_level_imports_count_type_checking_ones_do_not() -> None:
    source = (
        "from typing import TYPE_CHECKING\nfrom . import sibling\n"
        "if TYPE_CHECKING:\n    from outreach import hidden\n"
        "def f():\n    from outreach.deep import thing\n"
    )
    found = set(_imports(ast.parse(source), "outreach.pkg.mod", False))
    assert {"outreach.pkg.sibling", "outreach.deep.thing"} <= found
    assert not any("hidden" in name for name in found)


def test_no_import_cycles() -> None:
    found = sorted(cycles(import_graph()), key=sorted)
    described = ["  " + " → ".join(sorted(cycle)) for cycle in found]
    assert found == [], "import cycles:\n" + "\n".join(described)


#: The floors of the package, bottom first: each is a subpackage of ``outreach`` (or a top-level entry point). A
#: module may import from its own floor and the ones below, never from above. ``policy`` and ``providers`` share a
#: floor and do not import each other.
FLOORS: tuple[tuple[str, frozenset[str]], ...] = (
    ("core", frozenset({"core"})),
    ("domain", frozenset({"domain"})),
    ("policy and providers", frozenset({"policy", "providers"})),
    ("pipeline", frozenset({"pipeline"})),
    ("inbound", frozenset({"inbound"})),
    ("service", frozenset({"service"})),
    ("ops", frozenset({"ops"})),
    ("entry points", frozenset({"web", "cli", "__main__", "workers"})),
)


def floor_of(module: str) -> int:
    parts = module.split(".")
    name = parts[0] if parts[0] == "workers" or len(parts) == 1 else parts[1]
    if module == "outreach":
        return 0
    for index, (_, members) in enumerate(FLOORS):
        if name in members:
            return index
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__name__}")


def test_imports_only_go_down() -> None:
    upward = [
        f"  {module} ({FLOORS[floor_of(module)][0]}) imports {target} ({FLOORS[floor_of(target)][0]})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if floor_of(target) > floor_of(module)
    ]
    assert upward == [], "imports that go up a floor:\n" + "\n".join(upward)


def test_policy_and_providers_do_not_import_each_other() -> None:
    def package(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 2 else ""

    crossing = [
        f"{module} → {target}"
        for module, targets in import_graph().items()
        for target in targets
        if {package(module), package(target)} == {"policy", "providers"}
    ]
    assert crossing == []
