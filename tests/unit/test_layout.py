"""The layout's rules (worker/__init__.py): no import circle between modules, none between
packages, and every import between packages in the allowed direction. Read from the source with
`ast`: every import counts, at the top or inside a function, except under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ("worker", "tasks", "models", "messages")

# Each package (or top-level wiring module) and the packages it may import. Imports flow one way:
# cli, local -> tasks -> delivery -> storage -> messages -> models; brokers and operations serve
# the others and import none of tasks, delivery, storage or cli; config and endpoints are leaves.
ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "messages": {"models"},
    "worker.config": set(),
    "worker.endpoints": {"worker.config"},
    "worker.operations": {"worker.config", "worker.endpoints"},
    "worker.brokers": {"worker.config", "worker.endpoints", "worker.operations"},
    "worker.storage": {"models", "messages", "worker.config", "worker.endpoints"},
    "worker.delivery": {"models", "messages", "worker.storage", "worker.brokers", "worker.operations",
                        "worker.config", "worker.endpoints"},
    "worker.celery_app": {"worker.brokers", "worker.operations", "worker.config", "worker.endpoints"},
    "worker": {"worker.celery_app"},
    "tasks": {"models", "messages", "worker.storage", "worker.delivery", "worker.celery_app", "worker.config"},
    "worker.local": {"worker.storage", "worker.brokers", "worker.operations", "worker.console", "worker.config",
                     "worker.endpoints"},
    "worker.console": {"models", "worker.storage", "worker.delivery", "worker.brokers", "worker.operations",
                       "worker.celery_app", "worker.config", "worker.endpoints"},
    "worker.cli": {"models", "worker.storage", "worker.delivery", "worker.brokers", "worker.operations",
                   "worker.local", "worker.console", "worker.celery_app", "worker.config", "worker.endpoints"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in TOP for p in (ROOT / top).rglob("*.py")}


def type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped.update(id(n) for n in ast.walk(inner))
    return skipped


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The first-party modules `name` imports: `from a import b` is a.b where a.b is a module."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return {m for m in found if m in known and m != name}


def unit_of(module: str) -> str:
    """The package (or wiring module) a module belongs to: the longest name of ALLOWED it is in."""
    matches = [u for u in ALLOWED if module == u or module.startswith(u + ".")]
    return max(matches, key=len)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, set(known)) for name, path in known.items()}


def test_the_walk_sees_imports_inside_functions_and_skips_type_checking(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import b\n"
                      "def f():\n    from c import d\n    import e\n")
    assert imports_of("m", source, {"b", "c", "c.d", "e"}) == {"c.d", "e"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_between_modules(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_no_import_circle_between_packages(graph: dict[str, set[str]]) -> None:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(unit_of(module), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(module))
    assert cycles(packages) == []


def test_every_import_between_packages_goes_the_allowed_way(graph: dict[str, set[str]]) -> None:
    wrong = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                   if unit_of(target) != unit_of(module) and unit_of(target) not in ALLOWED[unit_of(module)])
    assert wrong == []


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for package in ("worker", "worker.delivery", "worker.storage", "worker.brokers", "worker.cli", "worker.local",
                    "worker.operations", "worker.console", "tasks", "models", "messages"):
        init = ROOT / package.replace(".", "/") / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc, f"{package}/__init__.py does not say which packages it may import"
