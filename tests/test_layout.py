"""The shape of src/lqmf: no import circles, layers import downwards only, engine folders stay small.

Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import still ties
two modules together."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lqmf"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The lqmf modules path imports (a `from package import module` names the module)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 50 and graph["lqmf.engine.serve.host"]  # the walk sees the package
    assert circles(graph) == []


def test_the_circle_check_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_downwards():
    """core imports no engine or cli; engine imports no cli (the multi-GPU ranks' entry module comes from
    the caller)."""
    for name, targets in import_graph().items():
        if name.startswith("lqmf.core"):
            assert not {t for t in targets if t.startswith(("lqmf.engine", "lqmf.cli"))}, name
        if name.startswith("lqmf.engine"):
            assert not {t for t in targets if t.startswith("lqmf.cli")}, name
    for path in (PACKAGE / "engine").rglob("*.py"):
        assert "lqmf.cli" not in path.read_text(encoding="utf-8"), path


def test_engine_folders_are_small_and_say_what_they_offer():
    for folder in [PACKAGE / "engine", *(p for p in (PACKAGE / "engine").iterdir() if p.is_dir() and p.name[0] != "_")]:
        files = sorted(folder.glob("*.py"))
        assert len(files) <= 11, (folder, [f.name for f in files])
        docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8")))
        assert docstring and len(docstring) > 40, f"{folder}/__init__.py says nothing of what it offers"
