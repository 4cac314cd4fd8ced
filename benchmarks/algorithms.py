"""Compare the policy optimizers on the default task: final eval reward, KL and wall time.

    python benchmarks/algorithms.py                     # all algorithms, default params
    python benchmarks/algorithms.py --algorithms ppo,grpo

It copies the repository into a temporary directory, runs `dvc repro` once (PPO, the default), then
`dvc exp run -S algorithm.name=<name>` for every other algorithm.  prepare, sft, rollout@r1 and
score@r1 are shared (DVC keeps them cached), so each algorithm's wall time is the time of the
stages that depend on it.  Writes benchmarks/results/algorithms.json and algorithms.md; the README
table is generated from the JSON (`python -m rlhf_core.docs`).  Not a test: nothing here passes or fails.
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
from rlhf_core.docs import render_algorithms  # noqa: E402  (after the path set-up)
ALGORITHMS = ("ppo", "reinforce", "a2c", "trpo", "npg", "grpo", "rloo")


def run(command: list[str], cwd: Path) -> tuple[str, float]:
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@example.com")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout + result.stderr, time.perf_counter() - started


def copy_repo(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name == "dvc.lock" or name.startswith(("metrics/", "plots/", "samples/")) or not (REPO / name).is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark"]):
        run(["git", *args], target)


def stage_seconds(output: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+): done in ([\d.]+)s$", output, re.M)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    names = [n for n in args.algorithms.split(",") if n]
    dvc = shutil.which("dvc") or sys.exit("dvc is not installed")

    results = []
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
        work = Path(tmp)
        copy_repo(work)
        output, seconds = run([dvc, "repro"], work)
        shared = {k: v for k, v in stage_seconds(output).items() if k in ("prepare", "sft", "rollout@r1", "score@r1")}
        baseline = json.loads((work / "metrics/eval.json").read_text())
        for name in names:
            if name == "ppo":
                evaluation, wall, stages = baseline, seconds - sum(shared.values()), stage_seconds(output)
            else:
                out, wall = run([dvc, "exp", "run", "-S", f"algorithm.name={name}"], work)
                evaluation, stages = json.loads((work / "metrics/eval.json").read_text()), stage_seconds(out)
            rounds = sorted((k for k in evaluation if k != "sft"), key=lambda k: (len(k), k))
            final = evaluation[rounds[-1]]
            results.append({
                "algorithm": name, "final_round": rounds[-1], "sft_reward": evaluation["sft"]["reward"],
                "final_reward": final["reward"], "reward_gain": final["reward"] - evaluation["sft"]["reward"],
                "final_kl": final["kl"], "final_distinct_2": final["distinct_2"],
                "wall_seconds": round(wall, 1), "optimize_seconds": round(sum(
                    v for k, v in stages.items() if k.startswith("optimize@")), 1),
            })
            print(json.dumps(results[-1]), flush=True)

    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"Python {platform.python_version()}",
              "command": "python benchmarks/algorithms.py", "shared_stage_seconds": shared, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "algorithms.json").write_text(json.dumps(report, indent=2) + "\n")
    table = render_algorithms(args.out / "algorithms.json")
    (args.out / "algorithms.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
