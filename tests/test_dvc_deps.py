"""dvc.yaml's deps cannot go stale: every project module a stage runs is a dependency of that stage.

A stage's command is `python -m rlhf_core.launch stages.<name>`, so what it runs is the import closure of the
launcher and of its script: every `import rlhf_core...` / `from rlhf_core... import ...` (function-local ones
included, found with `ast`), followed transitively through the project's own files.  Each file of the closure
must be listed in the stage's deps, or lie in a listed directory.  Before this test, `score` missed
rlhf_core/reward_model.py (the hf_classifier reward), `optimize` missed rollout.py and advantages.py, and
`evaluate` missed models.py, sft.py and tasks: an edit there left `dvc repro` serving stale outputs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from rlhf_core.reward_inputs import import_closure as closure_of
from rlhf_core.reward_inputs import module_file as closure_module_file

PACKAGES = ("rlhf_core", "stages")


def module_file(name: str) -> Path | None:
    """The file of a project module (``rlhf_core.tasks`` → rlhf_core/tasks/__init__.py), or None if not ours."""
    return closure_module_file(REPO, name) if name.split(".")[0] in PACKAGES else None


def import_closure(*modules: str) -> set[Path]:
    """The project files reached from ``modules`` through imports, function-local ones included (parent packages'
    __init__ too): rlhf_core.reward_inputs.import_closure, the walk that also fingerprints python scorers."""
    files: set[Path] = set()
    for module in modules:
        files |= set(closure_of(REPO, module, follow=lambda name: name.split(".")[0] in PACKAGES).values())
    return files


def stages_of(dvc: dict) -> dict[str, dict]:
    """Each stage of dvc.yaml (a foreach stage by its name) with its script module and deps."""
    out = {}
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        command = re.search(r"python -m (rlhf_core\.launch )?(stages\.\w+)", body["cmd"])
        runs = [command.group(2), *(["rlhf_core.launch"] if command.group(1) else [])]  # the launcher runs first
        out[name] = {"module": command.group(2), "runs": runs, "deps": [d for d in body.get("deps", []) if "${" not in d]}
    return out


DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


@pytest.mark.parametrize("stage", sorted(stages_of(DVC)))
def test_every_module_a_stage_runs_is_a_dependency(stage):
    spec = stages_of(DVC)[stage]
    closure = import_closure(*spec["runs"])
    deps = [REPO / d for d in spec["deps"]]

    def covered(path: Path) -> bool:
        return any(path == dep or dep in path.parents for dep in deps)

    missing = sorted(str(p.relative_to(REPO)) for p in closure if not covered(p) and p.stat().st_size > 0)
    assert not missing, f"dvc.yaml stage {stage!r} runs these modules but does not depend on them: {missing}"


def files_read(script: Path) -> set[str]:
    """The paths a stage script passes to read_parquet / read_json as literals or f-strings, with ``{round_key}``
    written as dvc.yaml's ``${key}``."""
    paths = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("read_parquet", "read_json") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant):
                paths.add(arg.value)
            elif isinstance(arg, ast.JoinedStr):
                paths.add("".join(part.value if isinstance(part, ast.Constant) else
                                  "${key}" if getattr(part.value, "id", "") == "round_key" else "{?}"
                                  for part in arg.values))
    return paths


@pytest.mark.parametrize("stage", sorted(stages_of(DVC)))
def test_every_file_a_stage_reads_is_a_dependency(stage):
    """optimize read metrics/<round>/advantages.json without declaring it."""
    body = DVC["stages"][stage].get("do", DVC["stages"][stage])
    deps = body.get("deps", [])
    read = files_read(module_file(stages_of(DVC)[stage]["module"]))
    missing = sorted(path for path in read if not any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} reads {missing} without declaring them"


def test_the_closure_follows_function_local_and_package_imports():
    """The walk itself: evaluate reaches tasks/ through rewards' function-local import, and models.py."""
    closure = {str(p.relative_to(REPO)) for p in import_closure("stages.evaluate")}
    assert {"rlhf_core/evaluation.py", "rlhf_core/rewards.py", "rlhf_core/models.py",
            "rlhf_core/tasks/__init__.py"} <= closure


# ---------------------------------------------------------------------------------------------------
# Regenerating the code deps: python tests/test_dvc_deps.py --write


def code_deps(spec: dict) -> list[str]:
    """The code deps of a stage (``stages_of``): its script, then the closure of what it runs (a package directory
    when the closure holds all of its files)."""
    script = module_file(spec["module"])
    closure = import_closure(*spec["runs"]) - {script}
    names = {str(p.relative_to(REPO)) for p in closure if p.stat().st_size > 0}  # an empty __init__ runs nothing
    for package in ("rlhf_core/algorithms", "rlhf_core/tasks"):
        files = {str(p.relative_to(REPO)) for p in (REPO / package).glob("*.py")}
        if files <= names:
            names = (names - files) | {package}
    return [str(script.relative_to(REPO)), *sorted(names)]


def rewrite_deps(text: str) -> str:
    """dvc.yaml with each stage's code deps (entries under stages/ or rlhf_core/) replaced by ``code_deps``; the
    data deps keep their place after them, and comments stay."""
    specs = stages_of(yaml.safe_load(text))
    lines, out, stage, index = text.splitlines(keepends=True), [], None, 0
    while index < len(lines):
        line = lines[index]
        header = re.match(r"^  (\w+):\s*$", line)
        if header:
            stage = header.group(1)
        deps_header = re.match(r"^(\s+)deps:\s*$", line)
        if deps_header and stage in specs:
            out.append(line)
            index += 1
            item_indent = None
            data = []
            while index < len(lines) and re.match(r"^\s+- ", lines[index]):
                item_indent = item_indent or lines[index][: lines[index].index("-")]
                entry = lines[index].strip()[2:]
                if not entry.startswith(("stages/", "rlhf_core/")):
                    data.append(entry)
                index += 1
            out += [f"{item_indent}- {entry}\n" for entry in [*code_deps(specs[stage]), *data]]
            continue
        out.append(line)
        index += 1
    return "".join(out)


def test_dvc_yaml_is_what_the_generator_writes():
    assert rewrite_deps((REPO / "dvc.yaml").read_text()) == (REPO / "dvc.yaml").read_text(), (
        "dvc.yaml's code deps are stale: run `python tests/test_dvc_deps.py --write`")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_dvc_deps.py --write   (rewrites the code deps of dvc.yaml)")
    sys.path.insert(0, str(Path(__file__).parent))
    (REPO / "dvc.yaml").write_text(rewrite_deps((REPO / "dvc.yaml").read_text()))
    print("dvc.yaml: code deps rewritten")
