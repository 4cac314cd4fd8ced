from conftest import REPO
from rlhf_core.docs import (RESULTS_END, RESULTS_START, current_block, render_block, render_results,
                            results_table)


def test_readme_params_reference_matches_the_schema():
    block = current_block((REPO / "README.md").read_text())
    assert block is not None, "README.md lost its params reference markers"
    assert block == render_block(), "README params reference is stale: run `python -m rlhf_core.docs`"


def test_readme_results_match_the_committed_eval_metrics():
    block = current_block((REPO / "README.md").read_text(), RESULTS_START, RESULTS_END)
    assert block == render_results(REPO / "metrics" / "eval.json"), "run `python -m rlhf_core.docs`"


def test_results_table_by_hand():
    row = {"kl": 0.5, "perplexity": 2.0, "distinct_2": 0.4, "length": 10.0}
    table = results_table({"sft": {**row, "reward": 0.1, "kl": 0.0}, "r10": {**row, "reward": 0.9, "distinct_2": 0.2},
                           "r2": {**row, "reward": 0.5}})
    assert [line.split(" | ")[0] for line in table.splitlines()[2:5]] == ["| sft", "| r2", "| r10"]
    assert "Reward gain of r10 over SFT: +0.800; distinct-2 kept: 50% of SFT's" in table


def test_readme_quick_start_installs_cpu_torch_first_and_ci_runs_the_test_command():
    readme = (REPO / "README.md").read_text()
    test_command = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                    'pip install -e ".[dev]" && python -m pytest -q')
    assert test_command in readme
    assert "pip install torch==2.13.0 && pip install -e . && dvc repro" in readme
    ci = (REPO / ".ci/run").read_text()
    assert 'pip install -q torch==2.13.0 && pip install -q -e ".[dev]" && python -m pytest -q' in ci


def test_readme_algorithm_table_matches_the_benchmark_results():
    from rlhf_core.docs import ALGORITHMS_END, ALGORITHMS_START, render_algorithms

    block = current_block((REPO / "README.md").read_text(), ALGORITHMS_START, ALGORITHMS_END)
    assert block == render_algorithms(REPO / "benchmarks" / "results" / "algorithms.json"), \
        "run `python -m rlhf_core.docs` after benchmarks/algorithms.py"
