"""Measure RL on the built-in arithmetic task: eval exact-match accuracy of SFT and of every round.

    python benchmarks/arithmetic.py                     # the default params with `task: arithmetic` (seed 0)
    python benchmarks/arithmetic.py --seeds 0,1,2       # the same, once per seed

It copies the repository into a temporary directory, sets `task: arithmetic` in params.yaml (and
`seed`, when it is not 0), runs `dvc repro` and reads metrics/eval.json.  Every other param keeps
its default: prepare, sft, 3 rounds of PPO, evaluate.  Writes benchmarks/results/arithmetic.json
and arithmetic.md; the block in docs/results.md is generated from the JSON (`python -m rlhf_core.tooling.docs`).
Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import REPO, copy_repo, dvc_executable, machine, round_keys, run, stage_seconds, write_report

from rlhf_core.tooling.docs import render_arithmetic


def measure(seed: int, dvc: str) -> dict:
    """One `dvc repro` with task: arithmetic (and the seed); its per-checkpoint eval metrics."""
    with tempfile.TemporaryDirectory(prefix="rlhf-arith-") as tmp:
        work = Path(tmp)
        copy_repo(work, {"task": "arithmetic", "seed": seed})
        output, seconds = run([dvc, "repro"], work)
        evaluation = json.loads((work / "metrics/eval.json").read_text())
        prepared = json.loads((work / "metrics/prepare.json").read_text())
        from rlhf_core.config import load_params

        ev = load_params(work / "params.yaml").evaluate
    names = ["sft", *round_keys(evaluation)]
    checkpoints = [{"checkpoint": name, "exact_match": evaluation[name]["exact_match"],
                    "reward": evaluation[name]["reward"], "kl": evaluation[name]["kl"],
                    "eos_fraction": evaluation[name]["eos_fraction"]} for name in names]
    return {"seed": seed, "final_round": names[-1], "sft_exact_match": checkpoints[0]["exact_match"],
            "final_exact_match": checkpoints[-1]["exact_match"],
            "exact_match_gain": checkpoints[-1]["exact_match"] - checkpoints[0]["exact_match"],
            "eval_prompts": min(prepared["eval_prompts"], ev.num_prompts), "eval_samples_per_prompt": ev.samples_per_prompt,
            "eval_temperature": ev.temperature, "wall_seconds": round(seconds, 1),
            "stage_seconds": stage_seconds(output), "checkpoints": checkpoints}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated values of `seed` (default: 0, the default params)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    dvc = dvc_executable()

    runs = []
    for seed in seeds:
        runs.append(measure(seed, dvc))
        print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("checkpoints", "stage_seconds")}), flush=True)

    command = "python benchmarks/arithmetic.py" + (f" --seeds {args.seeds}" if args.seeds != "0" else "")
    report = {"machine": machine(), "command": command, "params_changed": {"task": "arithmetic"}, "runs": runs}
    write_report(args.out, "arithmetic", report, render_arithmetic)


if __name__ == "__main__":
    main()
