"""The reward's inputs outside dvc.yaml's declared deps (rlhf_core/tooling/fingerprints.py): a python scorer's sources
and a local reward-model directory.  Their fingerprint is what makes an edit there re-score."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from rlhf_core.config import ScorerParams
from rlhf_core.errors import DataError
from rlhf_core.tooling import fingerprints as inputs


@pytest.fixture()
def scorer_package(tmp_path, monkeypatch):
    """my_scorers/ on sys.path: shout.py imports its rules from a sibling module, relatively; notes.py is not imported."""
    root = tmp_path / "code"
    package = root / "my_scorers"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "shout.py").write_text("def score(prompts, responses, metadata):\n"
                                      "    from .rules import BONUS\n"
                                      "    return [BONUS] * len(responses)\n")
    (package / "rules.py").write_text("import json\nBONUS = 1.0\n")
    (package / "notes.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(root))
    yield package
    for name in [n for n in sys.modules if n.startswith("my_scorers")]:
        del sys.modules[name]


def python_scorer(function: str) -> ScorerParams:
    return ScorerParams(name="shout", kind="python", function=function)


def test_a_python_scorers_fingerprint_covers_the_files_it_imports_and_only_those(scorer_package, tmp_path):
    first = inputs.reward_inputs([python_scorer("my_scorers.shout:score")], tmp_path)
    files = first["python_scorers"]["shout"]["files"]
    # the module, its package's __init__, and the sibling it imports function-locally and relatively; not
    # notes.py, nor the standard library's json
    assert sorted(files) == ["my_scorers/__init__.py", "my_scorers/rules.py", "my_scorers/shout.py"]
    (scorer_package / "notes.py").write_text("X = 2\n")
    assert inputs.reward_inputs([python_scorer("my_scorers.shout:score")], tmp_path) == first
    (scorer_package / "rules.py").write_text("import json\nBONUS = 2.0\n")
    changed = inputs.reward_inputs([python_scorer("my_scorers.shout:score")], tmp_path)
    assert changed["python_scorers"]["shout"]["files"]["my_scorers/rules.py"] != files["my_scorers/rules.py"]
    assert changed["python_scorers"]["shout"]["files"]["my_scorers/shout.py"] == files["my_scorers/shout.py"]


def test_an_installed_packages_scorer_follows_only_its_own_package(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    (site / "vendor_rewards").mkdir(parents=True)
    (site / "vendor_rewards" / "__init__.py").write_text("import other_library\nfrom . import core\n")
    (site / "vendor_rewards" / "core.py").write_text("def f(p, r, m):\n    return [0.0] * len(r)\n")
    (site / "other_library.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    try:
        files = inputs.module_sources("vendor_rewards")
    finally:
        sys.modules.pop("vendor_rewards", None)
    assert sorted(files) == ["vendor_rewards/__init__.py", "vendor_rewards/core.py"]


def test_a_missing_scorer_module_is_one_line(tmp_path):
    with pytest.raises(DataError, match="python scorer module 'no_such_scorer_module' cannot be found|is not a Python"):
        inputs.reward_inputs([python_scorer("no_such_scorer_module:f")], tmp_path)


def test_a_scorer_package_that_raises_or_does_not_parse_is_one_line(tmp_path, monkeypatch):
    """Finding a submodule runs its package's __init__ (the user's code), and the import walk parses every file."""
    (tmp_path / "raising").mkdir()
    (tmp_path / "raising" / "__init__.py").write_text("raise RuntimeError('no GPU here')\n")
    (tmp_path / "raising" / "score.py").write_text("")
    (tmp_path / "broken.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(DataError, match=r"'raising.score' cannot be found \(RuntimeError: no GPU here\)"):
            inputs.module_sources("raising.score")
        with pytest.raises(DataError, match=r"'broken': a file it imports cannot be read as Python \(SyntaxError"):
            inputs.module_sources("broken")
    finally:
        for name in ("raising", "raising.score", "broken"):
            sys.modules.pop(name, None)


def test_a_local_reward_model_directory_is_fingerprinted_unless_it_is_a_train_reward_output(tmp_path, monkeypatch):
    repo, outside = tmp_path / "repo", tmp_path / "elsewhere" / "rm"
    (repo / "reward_models" / "bt").mkdir(parents=True)
    outside.mkdir(parents=True)
    (outside / "config.json").write_text('{"num_labels": 1}')
    (outside / "model.safetensors").write_bytes(b"\0" * 4096)
    monkeypatch.chdir(repo)
    scorer = ScorerParams(name="rm", kind="hf_classifier",
                          model=(str(outside), "reward_models/bt", "org/hub-reward-model"))
    first = inputs.reward_inputs([scorer], repo)["model_directories"]
    assert first["org/hub-reward-model"] == "hub id (not fingerprinted)"
    assert "reward_models/bt" not in first  # a declared dependency of score and evaluate already
    assert sorted(first[str(outside)]) == ["config.json", "model.safetensors"]
    (outside / "config.json").write_text('{"num_labels": 2}')
    assert inputs.reward_inputs([scorer], repo)["model_directories"] != first


def test_files_above_the_content_limit_are_fingerprinted_by_size_and_mtime(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\1" * 100)
    monkeypatch.setattr(inputs, "CONTENT_HASH_LIMIT", 10)
    before = inputs.file_fingerprint(weights)
    assert before.startswith("size:100,mtime_ns:")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert inputs.file_fingerprint(weights) != before
    monkeypatch.setattr(inputs, "CONTENT_HASH_LIMIT", 1000)
    assert inputs.file_fingerprint(weights).startswith("sha256:")


def test_the_default_scorers_have_an_empty_fingerprint(tmp_path):
    from rlhf_core.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert inputs.reward_inputs(params.score.scorers, tmp_path) == {"python_scorers": {}, "model_directories": {}}
