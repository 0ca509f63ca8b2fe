"""Imports point one way, and no module imports itself round a cycle.

Every module's source is parsed (``ast``), so imports inside functions and under
``TYPE_CHECKING`` count too: they are how hidden cycles creep in.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

# The source folder of each top-level package, as pyproject.toml maps them.
PACKAGES = {
    "tether.api": ROOT / "protos" / "python",
    "tether.sdk": ROOT / "sdk",
    "tether.controller": ROOT / "controller",
    "tether.agent": ROOT / "agent",
}

# (importer, imported): an importer's module may not import anything under imported.
FORBIDDEN = [
    ("tether.controller", "tether.agent"),
    ("tether.agent", "tether.controller"),
    ("tether.sdk", "tether.controller"),
    ("tether.sdk", "tether.agent"),
    ("tether.api", "tether.sdk"),
    ("tether.api", "tether.controller"),
    ("tether.api", "tether.agent"),
]


def modules() -> dict[str, Path]:
    """Every module of the distribution: dotted name → file."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The distribution's modules that ``name`` imports, wherever in the file it does."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import mod` imports pkg.mod when it is a module, else a name of pkg.
            targets = [
                f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                for a in node.names
            ]
        else:
            continue
        for target in targets:
            # Importing a.b.c runs a/__init__ and a/b/__init__ too, except the packages that
            # hold the importer: those are already being imported when it runs.
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in known and prefix != name and not _under(name, prefix):
                    found.add(prefix)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the distribution's modules it imports."""
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
            elif colour.get(child) == GREY:
                return [*path[path.index(child) :], child]
            elif colour.get(child) == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that crosses a forbidden boundary, as ``importer -> imported``."""
    return sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        for dep in deps
        for importer, imported in FORBIDDEN
        if _under(mod, importer) and _under(dep, imported)
    )


def test_the_graph_sees_every_package_and_its_imports():
    graph = import_graph()
    assert {"tether.sdk.client", "tether.controller.server", "tether.agent.agent"} <= set(graph)
    # A sanity check of the parser on imports the code is known to make.
    assert "tether.sdk.errors" in graph["tether.sdk.client"]
    assert "tether.api.v1.types_pb2" in graph["tether.sdk.client"]


def test_imports_point_one_way():
    assert forbidden_imports(import_graph()) == []


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_the_checks_catch_what_they_look_for():
    bad = {
        "tether.controller.x": {"tether.agent.y"},
        "tether.agent.y": {"tether.sdk.z"},
        "tether.sdk.z": {"tether.agent.y"},
    }
    assert forbidden_imports(bad) == [
        "tether.controller.x -> tether.agent.y",
        "tether.sdk.z -> tether.agent.y",
    ]
    assert find_cycle(bad) == ["tether.agent.y", "tether.sdk.z", "tether.agent.y"]


def test_imports_inside_functions_count(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from tether.agent import runner\n")
    known = {"tether.agent", "tether.agent.runner", "tether.controller.m"}
    assert imports_of("tether.controller.m", src, known) == {"tether.agent", "tether.agent.runner"}
