"""Fingerprint what the stages read that dvc.yaml cannot list precisely: the code each stage runs, the reward's
inputs from outside the declared files (python scorer modules, local reward-model directories), whether the
rollout loads π_ref, and a python environment's source.

dvc.yaml runs this stage first on every `dvc repro` (always_changed); every other stage depends on its code
fingerprint, and score and evaluate on the reward's, so an edit re-runs exactly the stages that read what was
edited (rlhf_core/tooling/fingerprints.py)."""

from pathlib import Path

from rlhf_core.io import atomic_dir, write_json, write_json_into
from rlhf_core.runtime.cli import log, run_stage


def main(params, args):
    """Write fingerprints/code/<stage>.json for every stage, fingerprints/reward.json, fingerprints/reference.json and
    fingerprints/environment.json."""
    import yaml

    from rlhf_core.tooling.fingerprints import (
        CODE_DIR,
        ENVIRONMENT_FILE,
        REFERENCE_FILE,
        REWARD_FILE,
        code_fingerprints,
        environment_inputs,
        reward_inputs,
    )

    repo = Path.cwd()
    code = code_fingerprints(repo, yaml.safe_load((repo / "dvc.yaml").read_text()))
    with atomic_dir(CODE_DIR) as out:
        for stage, files in code.items():
            write_json_into(out, f"{stage}.json", files)
    inputs = reward_inputs(params.score.scorers, repo)
    write_json(REWARD_FILE, inputs)
    write_json(REFERENCE_FILE, {"uses_reference": params.uses_reference})
    write_json(ENVIRONMENT_FILE, environment_inputs(params.environment))
    local = sum(isinstance(value, dict) for value in inputs["model_directories"].values())
    log(f"fingerprints: the code of {len(code)} stages ({len({f for files in code.values() for f in files})} files); "
        f"{len(inputs['python_scorers'])} python scorer(s), {local} local reward-model directory(ies)")


if __name__ == "__main__":
    run_stage(main, name="fingerprints")
