"""The package's layering, read from the source with ``ast`` (nothing is imported): no import cycles, the study
stays on top, and the low-level modules stay below the commands.

Every import counts, at module level and inside functions (``from x import y`` counts as importing the submodule
``x.y`` when there is one, and importing a submodule imports its parent packages), and so does a ``"module:attribute"``
string naming a ``cast_lightning`` module, which is how ``cli.py`` imports its subcommands lazily. Imports under
``if TYPE_CHECKING:`` do not run and do not count.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = "cast_lightning"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

STUDY = f"{PACKAGE}.study"
# Modules allowed to import the study: the study itself and the command line that dispatches to it.
STUDY_IMPORTERS = (STUDY, f"{PACKAGE}.cli")
# Low-level modules: they must not depend, even indirectly, on the modules built on top of them.
LOW_LEVEL = tuple(f"{PACKAGE}.{name}" for name in ("generation", "checkpoints", "loading", "schedule"))
HIGH_LEVEL = tuple(f"{PACKAGE}.{name}" for name in ("module", "evaluation", "study", "cli"))
# Imported by lm-eval's task files: no heavy stack, at any depth.
LIGHT = f"{PACKAGE}.eval_data"
HEAVY = ("torch", "transformers", "lm_eval", "lightning", "datasets")

TARGET_STRING = re.compile(rf"^({re.escape(PACKAGE)}(?:\.\w+)*):\w+$")


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under ``root`` (``__init__.py`` is its package)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    for path in sorted(p for p in root.rglob("*") if p.is_dir() and "__pycache__" not in p.parts):
        if any(path.glob("*.py")):  # a namespace package (no __init__.py) is a node too, with no imports
            modules.setdefault(".".join((package, *path.relative_to(root).parts)), path)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, name: str, is_package: bool) -> tuple[set[str], set[str]]:
    """(dotted names imported, of which external top-level packages) by one module's source."""
    found: set[str] = set()
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base_parts = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = TARGET_STRING.match(node.value)
            if match:
                found.add(match.group(1))
    external = {n.split(".")[0] for n in found if n and not n.startswith(f"{PACKAGE}.") and n != PACKAGE}
    return found, external


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> package modules it imports, module -> external top-level packages it imports)."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        external[name] = set()
        if path.is_dir():
            continue
        names, external[name] = _imported_names(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
        own_ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for imported in names:
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c imports a, a.b and a.b.c
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name and prefix not in own_ancestors:
                    graph[name].add(prefix)
    return graph, external


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (``[a, b, ..., a]``) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = [0]

    def connect(node: str) -> None:  # Tarjan's algorithm (the package is small: recursion is fine)
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        # The shortest walk inside the component from its first module back to it: a cycle, every step shown.
        start = min(component)
        parents: dict[str, str | None] = {start: None}
        frontier, last = [start], None
        while frontier and last is None:
            following = []
            for node in frontier:
                targets = sorted(graph[node] & component)
                if start in targets:
                    last = node
                    break
                for target in targets:
                    if target not in parents:
                        parents[target] = node
                        following.append(target)
            frontier = following
        cycles.append([*chain(parents, last).split(" -> "), start])
    return cycles


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str | None]:
    """Every module ``start`` imports, directly or not, mapped to the module it was reached from."""
    parents: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    return parents


def chain(parents: dict[str, str | None], end: str) -> str:
    path = []
    node: str | None = end
    while node is not None:
        path.append(node)
        node = parents[node]
    return " -> ".join(reversed(path))


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def layering_problems(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    """Every violation of the rules in the module docstring, one line each (empty: the layering holds)."""
    graph, external = import_graph(root, package)
    problems = [f"import cycle: {' -> '.join(cycle)}" for cycle in find_cycles(graph)]
    for name, targets in sorted(graph.items()):
        if not _within(name, STUDY_IMPORTERS):
            problems += [f"{name} imports {t}: only the study and cli may" for t in sorted(targets) if _within(t, (STUDY,))]
    for low in LOW_LEVEL:
        if low not in graph:
            problems.append(f"{low} is missing")
            continue
        parents = reachable(graph, low)
        problems += [f"{low} depends on {t}: {chain(parents, t)}" for t in sorted(parents) if _within(t, HIGH_LEVEL)]
    if LIGHT in graph:
        parents = reachable(graph, LIGHT)
        for module in sorted(parents):
            for heavy in sorted(external[module] & set(HEAVY)):
                problems.append(f"{LIGHT} imports {heavy}: {chain(parents, module)} -> {heavy}")
    else:
        problems.append(f"{LIGHT} is missing")
    return problems


def test_the_package_has_no_import_cycles():
    cycles = find_cycles(import_graph()[0])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_package_layering_holds():
    problems = layering_problems()
    assert not problems, "\n".join(problems)


def test_the_checks_see_what_they_check(tmp_path):
    """A package with a function-level cycle, a study import from below, a low-level module importing a command
    through a relative import, a heavy import in the light module and a lazy "module:attribute" target: each is found."""
    root = tmp_path / PACKAGE
    files = {
        "__init__.py": "",
        "module.py": "def step():\n    from cast_lightning.evaluation import run\n",
        "evaluation.py": "from cast_lightning import checkpoints\ndef run():\n    from cast_lightning.module import step\n",
        "checkpoints.py": "from cast_lightning.loading import load\n",
        "loading.py": "def load():\n    from . import cli\n",
        "generation.py": "import torch\n",
        "schedule.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cast_lightning.module import step\n",
        "eval_data.py": "def read():\n    from cast_lightning.generation import x\n",
        "cli.py": 'TABLE = {"report": "cast_lightning.study.commands:report"}\n',
        "conflict.py": "def f():\n    from cast_lightning.study import plan\n",
        "study/__init__.py": "",
        "study/commands.py": "from cast_lightning.study.plan import Plan\n",
        "study/plan.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph, external = import_graph(root)
    assert f"{STUDY}.commands" in graph[f"{PACKAGE}.cli"]  # the lazy table target
    assert f"{PACKAGE}.module" not in graph[f"{PACKAGE}.schedule"]  # TYPE_CHECKING only
    assert f"{PACKAGE}.cli" in graph[f"{PACKAGE}.loading"]  # relative import resolved
    assert f"{PACKAGE}.study.plan" in graph[f"{PACKAGE}.conflict"]  # from package import submodule
    assert find_cycles(graph) == [[f"{PACKAGE}.evaluation", f"{PACKAGE}.module", f"{PACKAGE}.evaluation"]]
    problems = layering_problems(root)
    assert any(p.startswith("import cycle: cast_lightning.evaluation -> cast_lightning.module") for p in problems)
    assert f"{PACKAGE}.conflict imports {STUDY}: only the study and cli may" in problems
    assert f"{PACKAGE}.conflict imports {STUDY}.plan: only the study and cli may" in problems
    assert not any(p.startswith(f"{PACKAGE}.cli imports") for p in problems)
    assert (f"{PACKAGE}.checkpoints depends on {PACKAGE}.cli: "
            f"{PACKAGE}.checkpoints -> {PACKAGE}.loading -> {PACKAGE}.cli") in problems
    assert f"{LIGHT} imports torch: {LIGHT} -> {PACKAGE}.generation -> torch" in problems
    assert not any(p.startswith(f"{PACKAGE}.schedule") for p in problems)


@pytest.mark.parametrize("module", [*LOW_LEVEL, LIGHT])
def test_the_named_modules_exist(module):
    assert module in module_files(), module
