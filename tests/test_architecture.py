"""The package's shape: no import cycle inside selora/ (every import counts: inside functions and
under ``if TYPE_CHECKING:`` too), and modules, classes and functions a newcomer can read (limits
measured in lines, docstrings included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "selora"
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 450, 250, 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """selora modules ``tree`` imports anywhere (functions and ``TYPE_CHECKING`` blocks included)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selora"):
            for alias in node.names:  # `from selora import report` imports the module selora.report
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imported(tree, known) - {name} for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_and_type_checking_imports_count():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from selora.b import x\n"
        "def f():\n    from selora.c import y\nfrom selora import d\n"
    )
    assert imported(tree, {"selora.b", "selora.c", "selora.d"}) == {"selora.b", "selora.c", "selora.d"}


def test_no_import_cycle_inside_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_modules_classes_and_functions_stay_small():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE:
            too_long.append(f"{path.name}: {lines} lines")
        for node in ast.walk(tree):
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > limit:
                    too_long.append(f"{path.name}:{node.lineno} {node.name}: {size} lines")
    assert not too_long, "over the size limits: " + "; ".join(too_long)


def test_trainer_and_checkpoint_never_name_a_method():
    """Method-specific behaviour lives behind the Adapters interface (selora/methods/)."""
    for name in ("trainer.py", "checkpoint.py", "evaluation.py", "rundir.py", "pipeline.py"):
        source = (PACKAGE / name).read_text(encoding="utf-8")
        for method in ('"selora"', '"lora"', '"dylora"', '"adalora"', "adalora", "dylora"):
            assert method not in source.lower(), f"{name} names {method}"
