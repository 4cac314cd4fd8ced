"""The import graph of rlhf_core has no circle, and the light modules stay light.

Edges come from every import in a file, function-local ones included (found with `ast`): a function-local import
hides a circle from Python but not from a reader, and it still makes one module reach the other's code.  ``from a
import b`` is an edge to the submodule a.b when there is one, else to a.  Before this test, `rlhf_core.tooling.commands`
and its `samples` module imported each other, and `data → tasks → rewards → reward_model → data` made the
`prepare` stage reach model code.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "rlhf_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The project modules that the file at ``path`` imports, anywhere in it."""
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"  # the project imports absolutely
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                edges.add(target if target in MODULES else node.module)
        elif isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names)
    return {edge for edge in edges if edge in MODULES}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_no_module_of_rlhf_core_reaches_itself_through_its_imports():
    circles = sorted(name for name in GRAPH if name in reachable(name))
    assert not circles, f"modules on an import circle: {circles}"


def test_the_builtin_scoring_functions_and_the_tasks_import_nothing_back():
    assert GRAPH["rlhf_core.phases.scoring"] == set()  # VADER, exact match: usable from anywhere
    tasks = ("rlhf_core.phases.tasks", "rlhf_core.phases.tasks.sentiment", "rlhf_core.phases.tasks.arithmetic",
             "rlhf_core.phases.tasks.calculator")
    for task in tasks:
        assert reachable(task) <= {"rlhf_core.errors", "rlhf_core.phases.scoring", *tasks}, task


def test_preparing_prompts_reaches_no_model_code():
    reached = reachable("rlhf_core.phases.data")
    assert not reached & {"rlhf_core.model.loading", "rlhf_core.model.forward", "rlhf_core.phases.reward_model", "rlhf_core.phases.rewards"}, reached
    assert "rlhf_core.io" in reached  # table reading lives in io
    assert "read_table_file" not in (PACKAGE / "phases" / "data.py").read_text()


def test_a_planted_circle_is_found(monkeypatch):
    """The check itself: with one more edge (io → data), data ⇄ io is a circle."""
    monkeypatch.setitem(GRAPH, "rlhf_core.io", GRAPH["rlhf_core.io"] | {"rlhf_core.phases.data"})
    assert "rlhf_core.phases.data" in reachable("rlhf_core.phases.data")


def test_functions_stay_short_and_stage_mains_thin():
    """No function of rlhf_core or stages is over 80 lines (docstring included), and no stage's main over 50:
    validate was 186 lines, trpo's round 163, the update loop 151, the rollout stage's main 99."""
    import ast

    long, fat = [], []
    for folder in ("rlhf_core", "stages"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    where = f"{path.relative_to(REPO)}:{node.name} ({lines} lines)"
                    if lines > 80:
                        long.append(where)
                    if folder == "stages" and node.name == "main" and lines > 50:
                        fat.append(where)
    assert not long and not fat, (long, fat)


def test_no_module_imports_a_private_name_of_another_package():
    """A name that starts with _ is its module's own; another package reaching for it (distributed took
    models._pick_device, docs config._yaml_scalar) couples the two through what was meant to change freely.
    Modules of one package may share a private helper module (commands/_common.py)."""
    leaks = []
    for name, path in sorted(MODULES.items()):
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        aliases = {}
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in MODULES:
                for alias in node.names:
                    source = node.module if f"{node.module}.{alias.name}" not in MODULES else f"{node.module}.{alias.name}"
                    aliases[alias.asname or alias.name] = source
                    private_module_here = f"{node.module}.{alias.name}" in MODULES and node.module == package
                    if alias.name.startswith("_") and not alias.name.startswith("__") and not private_module_here:
                        leaks.append(f"{name}: from {node.module} import {alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                leaks.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    assert not leaks, leaks


# The layers, bottom first (rlhf_core/__init__.py): a module may import its own layer and those below it only.
# The algorithm registry sits under config, whose rules ask it for traits (it imports nothing of the project).
LAYERS = ("rlhf_core.errors rlhf_core.io", "rlhf_core.rl.algorithms.registry", "rlhf_core.config", "rlhf_core.model",
          "rlhf_core.runtime", "rlhf_core.rl", "rlhf_core.phases", "rlhf_core.tooling")


def layer_of(name: str) -> int:
    """The rank of module ``name``: its longest prefix among LAYERS (the package's root module: the bottom)."""
    ranks = {prefix: rank for rank, prefixes in enumerate(LAYERS) for prefix in prefixes.split()}
    matches = [prefix for prefix in ranks if name == prefix or name.startswith(prefix + ".")]
    return ranks[max(matches, key=len)] if matches else 0


def test_a_lower_layer_never_imports_a_higher_one():
    """model < runtime < rl < phases < tooling (with errors, io, the registry and config below): before the layers,
    model building imported the tasks, the update loop the rollout module, and the advantages the reward."""
    upward = [f"{name} -> {target}" for name, targets in sorted(GRAPH.items()) for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert not upward, upward
    top_level = sorted(path.name for path in PACKAGE.iterdir() if path.name != "__pycache__")
    assert len(top_level) <= 12, top_level
    assert all(layer_of(name) > 0 or name in ("rlhf_core", "rlhf_core.errors", "rlhf_core.io") for name in MODULES)
