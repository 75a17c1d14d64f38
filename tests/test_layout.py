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


DOCUMENTED = {"os._exit"}  # names with a leading underscore that their library documents


def library_internals(path: Path) -> list[str]:
    """Where path reads a private attribute (`x._name`, `getattr(x, "_name")`) of an object not its own,
    or re-points a parameter (`x.data = ...`)."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            mine = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            documented = isinstance(node.value, ast.Name) and f"{node.value.id}.{node.attr}" in DOCUMENTED
            if not (mine or documented) and node.attr not in own:
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("_")):
            found.append(f"{path.name}:{node.lineno} {node.func.id} {node.args[1].value}")
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Attribute) and t.attr == "data" for t in targets):
            found.append(f"{path.name}:{node.lineno} .data =")
    return found


def test_library_internals_only_in_compat():
    found = [hit for path in sorted((PACKAGE / "engine").rglob("*.py")) if path.name != "compat.py"
             for hit in library_internals(path)]
    assert found == []
    assert library_internals(PACKAGE / "engine" / "compat.py")  # the check sees them where they are


MAX_FUNCTION_LINES = 80


def raw_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's raw length: decorators, signature, docstring and body, functions defined inside it included."""
    first = min([function.lineno, *(decorator.lineno for decorator in function.decorator_list)])
    return function.end_lineno - first + 1


def top_functions(tree: ast.AST):
    """Functions and methods not defined inside another function (those count in their parent)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        else:
            yield from top_functions(node)


def long_functions(source: str) -> list[str]:
    return [f"{node.name} ({raw_lines(node)} lines)" for node in top_functions(ast.parse(source))
            if raw_lines(node) > MAX_FUNCTION_LINES]


def test_no_function_over_80_lines():
    long = [f"{path.relative_to(SRC)}:{name}" for path in sorted(PACKAGE.rglob("*.py"))
            for name in long_functions(path.read_text(encoding="utf-8"))]
    assert long == []


def test_the_length_check_counts_decorators_signature_and_nested_functions():
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    nested = "    def inner():\n" + "\n".join(f"        y{i} = {i}" for i in range(5))
    assert long_functions(f"@decorator\ndef f(\n    a,\n    b,\n):\n{body}\n{nested}\n") == ["f (81 lines)"]
    assert long_functions(f"def f():\n{body}\n") == []
    more = "\n".join(f"    z{i} = {i}" for i in range(5))
    method = "class C:\n" + "\n".join("    " + line for line in f"def m():\n{body}\n{more}\n{nested}".splitlines())
    assert long_functions(method) == ["m (82 lines)"]


def test_tests_mirror_src_and_import_no_other_test():
    """tests/core, tests/cli, tests/engine/<package> mirror src/lqmf; shared helpers are in tests/helpers.py."""
    tests = SRC.parent / "tests"
    for folder in ("core", "cli", "engine", "engine/lora", "engine/decode", "engine/serve", "engine/train",
                   "engine/fused"):
        assert (PACKAGE / folder).is_dir() and list((tests / folder).glob("test_*.py")), folder
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
                assert node.module == "tests.helpers", f"{path.relative_to(tests)} imports {node.module}"
