"""dvc.yaml's deps cannot go stale: every project module a stage runs is a dependency of that stage.

A stage's command is `python -m rlhf_core.runtime.launch stages.<name>`, so what it runs is the import closure of the
launcher and of its script: every `import rlhf_core...` / `from rlhf_core... import ...` (function-local ones
included, found with `ast`), followed transitively through the project's own files.  The `fingerprints` stage
walks that closure on every `dvc repro` and writes fingerprints/code/<stage>.json; each stage depends on its
file.  Before the walk, `score` missed rlhf_core/phases/reward_model.py (the hf_classifier reward), `optimize` missed
rollout.py and advantages.py, and `evaluate` missed models.py (now model/), sft.py and tasks: an edit there left `dvc repro`
serving stale outputs.  Later, hand-kept (then generated) module lists made dvc.lock 160 KB for ten rounds.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from rlhf_core.tooling.fingerprints import CODE_DIR, STAGE, code_closure, code_fingerprints, stage_modules

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = sorted(name for name in DVC["stages"] if name != STAGE)


def body(stage: str) -> dict:
    return DVC["stages"][stage].get("do", DVC["stages"][stage])


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_depends_on_the_fingerprint_of_its_code(stage):
    deps = body(stage).get("deps", [])
    assert f"{CODE_DIR}/{stage}.json" in deps, f"dvc.yaml stage {stage!r} must depend on {CODE_DIR}/{stage}.json"
    listed = [d for d in deps if d.startswith(("rlhf_core/", "stages/"))]
    assert not listed, f"dvc.yaml stage {stage!r} lists code that its fingerprint already covers: {listed}"


def test_the_fingerprint_stage_runs_on_every_repro_and_reads_no_torch():
    fingerprints = DVC["stages"][STAGE]
    assert fingerprints["always_changed"] is True
    closure = code_closure(REPO, stage_modules(DVC)[STAGE])
    imported = set()
    for path in closure.values():
        imported |= {node.names[0].name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "")
                     for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))}
    assert "torch" not in imported and "transformers" not in imported


def test_the_fingerprints_cover_the_modules_that_went_stale_before():
    """What each stage once missed is in its fingerprint; an empty __init__ is not (it runs nothing)."""
    code = code_fingerprints(REPO, DVC)
    assert set(code) == set(STAGES)
    assert "rlhf_core/phases/reward_model.py" in code["score"]
    assert {"rlhf_core/model/forward.py", "rlhf_core/rl/advantages.py", "stages/optimize.py", "rlhf_core/runtime/launch.py"} <= set(code["optimize"])
    assert "rlhf_core/phases/rollout.py" not in code["optimize"]  # the layers: rl no longer reaches the rollout phase
    assert {"rlhf_core/model/forward.py", "rlhf_core/phases/sft.py", "rlhf_core/phases/tasks/__init__.py"} <= set(code["evaluate"])
    assert "rlhf_core/rl/algorithms/ppo.py" in code["optimize"] and "rlhf_core/rl/algorithms/ppo.py" not in code["prepare"]
    assert all(value.startswith("sha256:") for files in code.values() for value in files.values())


def test_an_edit_changes_the_fingerprint_of_exactly_the_stages_that_run_the_file(tmp_path):
    for name in ("rlhf_core", "stages"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_fingerprints(tmp_path, DVC)
    with open(tmp_path / "rlhf_core/rl/advantages.py", "a") as handle:
        handle.write("# an edit\n")
    after = code_fingerprints(tmp_path, DVC)
    changed = {stage for stage in before if before[stage] != after[stage]}
    assert changed == {stage for stage, files in before.items() if "rlhf_core/rl/advantages.py" in files}
    assert {"advantages", "optimize"} <= changed and "prepare" not in changed and "sft" not in changed


@pytest.mark.parametrize("neutral", ["rlhf_core/runtime/warm.py", "rlhf_core/runtime/ray_launch.py", "rlhf_core/runtime/progress.py",
                                     "rlhf_core/runtime/stage_times.py", "rlhf_core/config/rendering.py", "rlhf_core/tooling/docs.py"])
def test_editing_code_that_cannot_change_an_output_re_runs_nothing(tmp_path, neutral):
    """The warm-start server, the follower, progress, timing and the renderers are in no stage's fingerprint (a help
    string or a progress line edited used to re-run the whole pipeline), while a math module still re-runs exactly
    the stages that run it (the test above)."""
    for name in ("rlhf_core", "stages"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_fingerprints(tmp_path, DVC)
    assert not any(neutral in files for files in before.values())
    with open(tmp_path / neutral, "a") as handle:
        handle.write("# an edit\n")
    assert code_fingerprints(tmp_path, DVC) == before
    with open(tmp_path / "rlhf_core/config/sections.py", "a") as handle:  # the params models: every stage reads them
        handle.write("# an edit\n")
    assert all(after != before[stage] for stage, after in code_fingerprints(tmp_path, DVC).items())


def test_the_fingerprint_stage_writes_one_file_per_stage(tmp_path):
    """stages.fingerprints in a copy of the repository's code and dvc.yaml (no DVC): one JSON per stage."""
    for name in ("rlhf_core", "stages"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, tmp_path / name)
    result = subprocess.run([sys.executable, "-m", "stages.fingerprints"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    written = {path.stem: json.loads(path.read_text()) for path in (tmp_path / CODE_DIR).glob("*.json")}
    assert written == code_fingerprints(tmp_path, DVC)
    assert json.loads((tmp_path / "fingerprints/reward.json").read_text()) == {"python_scorers": {}, "model_directories": {}}
    assert json.loads((tmp_path / "fingerprints/reference.json").read_text()) == {"uses_reference": True}


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


@pytest.mark.parametrize("stage", STAGES)
def test_every_file_a_stage_reads_is_a_dependency(stage):
    """optimize read metrics/<round>/advantages.json without declaring it."""
    deps = body(stage).get("deps", [])
    read = files_read(REPO / (stage_modules(DVC)[stage][0].replace(".", "/") + ".py"))
    missing = sorted(path for path in read if not any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} reads {missing} without declaring them"


def test_the_closure_follows_function_local_and_package_imports():
    """The walk itself: evaluate reaches tasks/ through rewards' function-local import, and model/forward.py."""
    closure = set(code_closure(REPO, ["stages.evaluate"]))
    assert {"rlhf_core/phases/evaluation.py", "rlhf_core/phases/rewards.py", "rlhf_core/model/forward.py",
            "rlhf_core/phases/tasks/__init__.py"} <= closure


def test_the_stage_modules_of_any_command_form():
    """Dotted modules, chained commands and list-form cmds; a stage of your own that runs no stage module is left to
    its own deps (not an error that would stop every repro)."""
    dvc = {"stages": {"custom": {"cmd": "bash make.sh"},
                      "nested": {"cmd": "python -m stages.extra.export --out x"},
                      "chained": {"cmd": ["python -m stages.prepare", "python -m rlhf_core.runtime.launch stages.sft"]},
                      "looped": {"foreach": [1], "do": {"cmd": "python3 -m stages.score --round ${item}"}}}}
    assert stage_modules(dvc) == {"nested": ["stages.extra.export"],
                                  "chained": ["stages.prepare", "stages.sft", "rlhf_core.runtime.launch"],
                                  "looped": ["stages.score"]}
