"""The package's shape: no import cycle inside selora/ (every import counts: inside functions and
under ``if TYPE_CHECKING:`` too), and modules, classes and functions a newcomer can read (limits
measured in lines, docstrings included)."""

from __future__ import annotations

import ast
import sys
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
    loop = ("trainer.py", "train_step.py", "checkpoint.py", "run_state.py", "held_out.py", "rundir.py")
    for name in (*loop, "pipeline.py"):
        source = (PACKAGE / name).read_text(encoding="utf-8")
        for method in ('"selora"', '"lora"', '"dylora"', '"adalora"', "adalora", "dylora"):
            assert method not in source.lower(), f"{name} names {method}"


# -- the layout: core / library / book helpers ------------------------------------------------------
#: What the core (selora/core/) may import besides itself: the standard library and torch.
CORE_THIRD_PARTY = {"torch"}
#: The command lines: the only modules that may import the trainer.
CLI_MODULES = {"selora.train", "selora.evaluate"}


def third_party_imports(tree: ast.Module) -> set[str]:
    """Top-level names of every non-selora module ``tree`` imports (anywhere), standard library included."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out - {"selora", "__future__"}


def test_core_imports_torch_only():
    for name, tree in modules().items():
        if name.startswith("selora.core"):
            outside = {m for m in third_party_imports(tree) if m not in sys.stdlib_module_names} - CORE_THIRD_PARTY
            assert not outside, f"{name} imports {sorted(outside)}: the core imports torch only"
            below = {m for m in imported(tree, set(modules())) if not m.startswith("selora.core")}
            assert not below, f"{name} imports {sorted(below)}: the core imports nothing of the library"


def test_no_library_module_imports_a_book_helper():
    for name, deps in import_graph().items():
        if not name.startswith("selora.book"):
            helpers = sorted(d for d in deps if d.startswith("selora.book"))
            assert not helpers, f"{name} imports the chapter helpers {helpers}"


def test_only_the_command_lines_import_the_trainer():
    importers = sorted(n for n, deps in import_graph().items() if "selora.trainer" in deps)
    assert set(importers) <= CLI_MODULES | {"selora"}, f"the trainer is imported by {importers}"


def test_checkpointer_and_held_out_check_never_receive_the_trainer():
    """They take explicit parts (run folder, state, models, data, the distributed handle)."""
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in ("Checkpointer", "Evaluator"):
                assert "selora.trainer" not in imported(tree, set(modules())), f"{name} imports the trainer"
                for fn in (n for n in node.body if isinstance(n, ast.FunctionDef)):
                    args = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
                    assert not {"trainer", "tr"} & set(args), f"{node.name}.{fn.name} takes the trainer"


def names_compared(tree: ast.Module) -> set[str]:
    """String constants ``tree`` compares with ``==``/``!=``/``in`` (either side)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                out.update(e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
    return out


def test_no_method_or_criterion_name_is_compared_outside_its_registry():
    """Methods, criteria and adapter-layer kinds are looked up in their registries (``selora.methods``,
    ``selora.core.criteria``, ``selora.core.inject``), which alone may compare their names ("selora" and
    "lora" are both a method and a layer kind)."""
    from selora.core.criteria import CRITERIA
    from selora.core.inject import KINDS
    from selora.methods import METHODS

    registries = {"selora.methods": set(METHODS), "selora.core.criteria": set(CRITERIA)}
    registries["selora.core.inject"] = set(KINDS)
    names = set().union(*registries.values())
    for name, tree in modules().items():
        compared = names_compared(tree) & (names - registries.get(name, set()))
        assert not compared, f"{name} compares {sorted(compared)}: look them up in their registry"


def test_the_name_check_sees_a_planted_comparison():
    tree = ast.parse("if cfg.method == 'lora' or m in ('selora', 'x'):\n    pass\n")
    assert names_compared(tree) == {"lora", "selora", "x"}
