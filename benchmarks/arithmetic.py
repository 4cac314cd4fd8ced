"""Measure RL on the built-in arithmetic task: eval exact-match accuracy of SFT and of every round.

    python benchmarks/arithmetic.py                     # the default params with `task: arithmetic` (seed 0)
    python benchmarks/arithmetic.py --seeds 0,1,2       # the same, once per seed

It copies the repository into a temporary directory, sets `task: arithmetic` in params.yaml (and
`seed`, when it is not 0), runs `dvc repro` and reads metrics/eval.json.  Every other param keeps
its default: prepare, sft, 3 rounds of PPO, evaluate.  Writes benchmarks/results/arithmetic.json
and arithmetic.md; the README block is generated from the JSON (`python -m rlhf_core.docs`).
Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rlhf_core.docs import render_arithmetic  # noqa: E402  (after the path set-up)


def run(command: list[str], cwd: Path) -> tuple[str, float]:
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@example.com")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout + result.stderr, time.perf_counter() - started


def copy_repo(target: Path, changes: dict) -> None:
    """A git repository at ``target`` with this repo's files (minus results) and ``changes`` in params.yaml."""
    import yaml

    from rlhf_core.config import params_from_dict, render_params_yaml

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name == "dvc.lock" or name.startswith(("metrics/", "plots/", "samples/")) or not (REPO / name).is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)
    raw = yaml.safe_load((target / "params.yaml").read_text())
    raw.update(changes)
    (target / "params.yaml").write_text(render_params_yaml(params_from_dict(raw)))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark"]):
        run(["git", *args], target)


def stage_seconds(output: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+): done in ([\d.]+)s$", output, re.M)}


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
    names = ["sft", *sorted((k for k in evaluation if k != "sft"), key=lambda k: (len(k), k))]
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
    dvc = shutil.which("dvc") or sys.exit("dvc is not installed")

    runs = []
    for seed in seeds:
        runs.append(measure(seed, dvc))
        print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("checkpoints", "stage_seconds")}), flush=True)

    command = "python benchmarks/arithmetic.py" + (f" --seeds {args.seeds}" if args.seeds != "0" else "")
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"Python {platform.python_version()}",
              "command": command, "params_changed": {"task": "arithmetic"}, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arithmetic.json").write_text(json.dumps(report, indent=2) + "\n")
    table = render_arithmetic(args.out / "arithmetic.json")
    (args.out / "arithmetic.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
