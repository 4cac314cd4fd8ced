"""Fingerprint what the reward reads from outside the declared deps: python scorer modules, local reward models.

dvc.yaml runs this stage on every `dvc repro` (always_changed); score and evaluate depend on its output, so
editing a python scorer's module or a local reward-model directory re-scores (rlhf_core/reward_inputs.py)."""

from pathlib import Path

from rlhf_core.cli import log, run_stage
from rlhf_core.io import write_json


def main(params, args):
    """Write scores/reward_inputs.json: the fingerprint of the python scorers' sources and local reward models."""
    from rlhf_core.reward_inputs import reward_inputs

    inputs = reward_inputs(params.score.scorers, Path.cwd())
    write_json("scores/reward_inputs.json", inputs)
    local = sum(isinstance(value, dict) for value in inputs["model_directories"].values())
    log(f"reward_inputs: {len(inputs['python_scorers'])} python scorer(s), {local} local reward-model directory(ies)")


if __name__ == "__main__":
    run_stage(main, name="reward_inputs")
