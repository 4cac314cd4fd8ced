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
    install = "pip install torch==2.13.0 && pip install -r requirements.lock && pip install --no-deps -e"
    test_command = (f'python3 -m venv .venv && . .venv/bin/activate && {install} ".[dev]" && python -m pytest -q && '
                    'python -m pytest -q -m e2e')
    assert test_command in readme
    assert f"{install} . && dvc repro" in readme
    ci = (REPO / ".ci/run").read_text()
    assert ('pip install -q torch==2.13.0 && pip install -q -r requirements.lock && pip install -q --no-deps -e ".[dev]" '
            '&& python -m pytest -q && python -m pytest -q -m e2e') in ci


def test_readme_algorithm_table_matches_the_benchmark_results():
    from rlhf_core.docs import ALGORITHMS_END, ALGORITHMS_START, render_algorithms

    block = current_block((REPO / "README.md").read_text(), ALGORITHMS_START, ALGORITHMS_END)
    assert block == render_algorithms(REPO / "benchmarks" / "results" / "algorithms.json"), \
        "run `python -m rlhf_core.docs` after benchmarks/algorithms.py"


def test_readme_arithmetic_block_matches_the_benchmark_results():
    from rlhf_core.docs import ARITHMETIC_END, ARITHMETIC_START, render_arithmetic

    block = current_block((REPO / "README.md").read_text(), ARITHMETIC_START, ARITHMETIC_END)
    assert block == render_arithmetic(REPO / "benchmarks" / "results" / "arithmetic.json"), \
        "run `python -m rlhf_core.docs` after benchmarks/arithmetic.py"


def test_arithmetic_block_by_hand(tmp_path):
    import json

    from rlhf_core.docs import render_arithmetic

    def run(seed, exact):
        names = ["sft", "r1", "r2"]
        return {"seed": seed, "final_round": "r2", "exact_match_gain": exact[-1] - exact[0], "eval_prompts": 64,
                "eval_samples_per_prompt": 2, "eval_temperature": 1.0, "wall_seconds": 120.4,
                "checkpoints": [{"checkpoint": n, "exact_match": e, "kl": 0.1 * i} for i, (n, e) in enumerate(zip(names, exact))]}

    path = tmp_path / "arithmetic.json"
    path.write_text(json.dumps({"machine": "m", "command": "python benchmarks/arithmetic.py --seeds 0,5",
                                "runs": [run(0, [0.25, 0.5, 0.75]), run(5, [0.5, 0.5, 0.625])]}))
    lines = render_arithmetic(path).splitlines()
    assert lines[1] == "| checkpoint | eval exact match (seed 0) | eval exact match (seed 5) | KL to π_ref (seed 0) |"
    assert lines[2] == "|---|---|---|---|"
    assert lines[3:6] == ["| sft | 0.250 | 0.500 | 0.000 |", "| r1 | 0.500 | 0.500 | 0.100 |", "| r2 | 0.750 | 0.625 | 0.200 |"]
    assert "Gain in eval exact-match accuracy of r2 over SFT: +0.500 (seed 0); +0.125 (seed 5); mean +0.312." in lines[7]
    assert "`python benchmarks/arithmetic.py --seeds 0,5`, 120 s per run." in lines[7]


def test_readme_reward_model_block_matches_the_benchmark_results():
    from rlhf_core.docs import REWARD_MODEL_END, REWARD_MODEL_START, render_reward_model

    block = current_block((REPO / "README.md").read_text(), REWARD_MODEL_START, REWARD_MODEL_END)
    assert block == render_reward_model(REPO / "benchmarks" / "results" / "reward_model.json"), \
        "run `python -m rlhf_core.docs` after benchmarks/reward_model.py"
    assert "VADER sentiment of r3 over SFT: +" in block
