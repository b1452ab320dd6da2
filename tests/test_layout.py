"""The package's layering, read from its source with ast: no import circle, each layer imports only the layers
below it (format < backends < store < torch < bench / CLI), CLI command modules share only cli/common.py, and
no module grows past a size one can read without a stated reason."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "castore"
MAX_LINES = 600
# module -> why it may be longer than MAX_LINES
LONG_MODULES_ALLOWED: dict[str, str] = {}
# Command modules of the CLI: registered by castore/cli/__init__.py, sharing castore/cli/common.py only.
CLI_SHARED = {"castore.cli", "castore.cli.common"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def castore_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, source: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(castore modules imported when the module runs, castore modules imported anywhere in it): the first from
    module-level statements (if/try included, ``if TYPE_CHECKING:`` left out), the second also from functions."""
    is_package = name in known and any(k.startswith(name + ".") for k in known) or name == "castore"
    module_level: set[str] = set()
    anywhere: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        found = set()
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            names: list[str] = []
        else:
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            bases = [base]
            names = [alias.name for alias in node.names]
        for base in bases:
            if not (base == "castore" or base.startswith("castore.")):
                continue
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            found |= set(subs) if subs and len(subs) == len(names) else {base, *subs}
        return found

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, in_function=True)  # never runs: counts for layering, not for circles
                for stmt in child.orelse:
                    visit_stmt(stmt, in_function)
                continue
            visit_stmt(child, in_function)

    def visit_stmt(child: ast.AST, in_function: bool) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found = targets(child)
            anywhere.update(found)
            if not in_function:
                module_level.update(found)
        visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), in_function=False)
    module_level.discard(name)
    anywhere.discard(name)
    return module_level, anywhere


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = castore_modules()
    known = set(modules)
    at_import: dict[str, set[str]] = {}
    anywhere: dict[str, set[str]] = {}
    for name, path in modules.items():
        at_import[name], anywhere[name] = imports_of(name, path.read_text(), known)
    return at_import, anywhere


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


AT_IMPORT, ANYWHERE = import_graph()


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(importer_package: str, forbidden: list[str]) -> list[str]:
    return sorted(
        f"{importer} imports {target}"
        for importer, targets in ANYWHERE.items()
        if _in(importer, importer_package)
        for target in targets
        if any(_in(target, f) for f in forbidden)
    )


def test_the_checker_reads_every_kind_of_import_and_finds_a_circle() -> None:
    """The parser sees relative, from-package and function-level imports; the cycle finder finds a circle."""
    known = {"castore", "castore.a", "castore.b", "castore.pkg", "castore.pkg.c"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "import castore.a\n"
        "from castore.pkg import c\n"
        "if TYPE_CHECKING:\n    from castore import b\n"
        "def f():\n    from . import b\n"
    )
    module_level, anywhere = imports_of("castore.pkg.d", source, known | {"castore.pkg.d"})
    assert module_level == {"castore.a", "castore.pkg.c"}
    assert anywhere == {"castore.a", "castore.pkg.c", "castore.b", "castore.pkg"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a"}}) is None


def test_no_import_circle_among_castore_modules() -> None:
    assert find_cycle(AT_IMPORT) is None


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("castore.format", ["castore.backends", "castore.torch", "castore.cli", "castore.bench", "castore.store"]),
        ("castore.backends", ["castore.torch", "castore.cli", "castore.bench", "castore.store"]),
        ("castore.errors", ["castore.format", "castore.backends", "castore.store", "castore.torch", "castore.cli", "castore.bench"]),
        ("castore.config", ["castore.backends", "castore.store", "castore.torch", "castore.cli", "castore.bench"]),
        ("castore.local_layer", ["castore.store", "castore.torch", "castore.cli", "castore.bench"]),
        ("castore.store", ["castore.torch", "castore.cli", "castore.bench"]),
        ("castore.torch", ["castore.cli", "castore.bench", "castore.backends.s3"]),
        ("castore.bench", ["castore.cli"]),
    ],
)
def test_each_layer_imports_only_the_layers_below_it(package: str, forbidden: list[str]) -> None:
    assert violations(package, forbidden) == []


def test_cli_command_modules_import_nothing_of_each_other() -> None:
    commands = [m for m in AT_IMPORT if m.startswith("castore.cli.") and m not in CLI_SHARED]
    assert commands, "no CLI command modules found"
    crossing = sorted(
        f"{importer} imports {target}"
        for importer in commands
        for target in ANYWHERE[importer]
        if _in(target, "castore.cli") and target != "castore.cli.common"
    )
    assert crossing == []


def test_no_module_over_600_lines_without_a_stated_reason() -> None:
    long = {name: len(path.read_text().splitlines()) for name, path in castore_modules().items()}
    over = {name: n for name, n in long.items() if n > MAX_LINES and name not in LONG_MODULES_ALLOWED}
    assert over == {}, f"split these modules where their parts change for different reasons, or allow them with a reason: {over}"
    assert all(reason.strip() for reason in LONG_MODULES_ALLOWED.values())


def test_demo_and_benchmark_code_live_outside_the_torch_integration() -> None:
    torch_modules = [m for m in castore_modules() if _in(m, "castore.torch")]
    assert not [m for m in torch_modules if "demo" in m or "bench" in m]
