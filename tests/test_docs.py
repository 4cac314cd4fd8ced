from conftest import REPO
from rlhf_core.docs import current_block, render_block


def test_readme_params_reference_matches_the_schema():
    block = current_block((REPO / "README.md").read_text())
    assert block is not None, "README.md lost its params reference markers"
    assert block == render_block(), "README params reference is stale: run `python -m rlhf_core.docs`"


def test_readme_quick_start_installs_cpu_torch_first_and_ci_runs_the_test_command():
    readme = (REPO / "README.md").read_text()
    test_command = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                    'pip install -e ".[dev]" && python -m pytest -q')
    assert test_command in readme
    assert "pip install torch==2.13.0 && pip install -e . && dvc repro" in readme
    ci = (REPO / ".ci/run").read_text()
    assert 'pip install -q torch==2.13.0 && pip install -q -e ".[dev]" && python -m pytest -q' in ci
