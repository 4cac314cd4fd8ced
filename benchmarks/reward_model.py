"""A pipeline rewarded only by a trained reward model: does it learn the signal the model was trained on?

    python benchmarks/reward_model.py

Copies the repository into a temporary directory with default params plus
    reward_models: {bt: {}}                     # train_reward@bt on the built-in sentiment preferences
    score.scorers: [rm: hf_classifier reward_models/bt (running normalisation),
                    sentiment: vader with weight 0  (monitored, not rewarded)]
runs `dvc repro`, and reports the reward model's held-out pair accuracy and the eval VADER sentiment
of every checkpoint.  Writes benchmarks/results/reward_model.json and reward_model.md; the block in
docs/results.md is generated from the JSON (`python -m rlhf_core.tooling.docs`).  Not a test: nothing passes or fails.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import REPO, copy_repo, dvc_executable, machine, round_keys, run, stage_seconds, write_report

from rlhf_core.tooling.docs import render_reward_model

CHANGES = {
    "reward_models": {"bt": {}},
    "score": {"scorers": [
        {"name": "rm", "kind": "hf_classifier", "model": "reward_models/bt", "normalize": "running"},
        {"name": "sentiment", "kind": "vader", "weight": 0.0},
    ], "missing_eos_penalty": 0.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-rm-") as tmp:
        work = Path(tmp)
        copy_repo(work, CHANGES)
        output, seconds = run([dvc_executable(), "repro"], work)
        evaluation = json.loads((work / "metrics/eval.json").read_text())
        reward_model = json.loads((work / "metrics/reward_models/bt.json").read_text())
    checkpoints = ["sft", *round_keys(evaluation)]
    report = {
        "machine": machine(), "command": "python benchmarks/reward_model.py", "params_changes": CHANGES,
        "wall_seconds": round(seconds, 1), "train_reward_seconds": stage_seconds(output).get("train_reward@bt"),
        "heldout_pair_accuracy": reward_model["heldout_pair_accuracy"],
        "heldout_pair_accuracy_before": reward_model["heldout_pair_accuracy_before"],
        "heldout_pairs": reward_model["heldout_pairs"],
        "checkpoints": [{"checkpoint": name, "reward_rm": evaluation[name]["reward_rm"],
                         "vader": evaluation[name]["reward_sentiment"], "kl": evaluation[name]["kl"],
                         "distinct_2": evaluation[name]["distinct_2"]} for name in checkpoints],
    }
    write_report(args.out, "reward_model", report, render_reward_model)


if __name__ == "__main__":
    main()
