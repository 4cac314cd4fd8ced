"""`dvc repro` of the default pipeline at two revisions, side by side on this machine.

    python benchmarks/repro_speedup.py                       # before issue 5 (0142298) vs HEAD, 2 runs each
    python benchmarks/repro_speedup.py --before REV --after REV --repeats 3
    python benchmarks/repro_speedup.py --variant "HEAD, cpu_threads 1, cold=cpu_threads=1,compute.warm_start=false"

Each run is a fresh `git clone` of the revision into a temporary directory (no DVC cache, no outputs,
no warm-start server of an earlier run), then `dvc repro` of everything, timed from the outside.
Revisions run interleaved (before, after, before, after, …) so that a drift in machine load hits both.
A ``--variant "LABEL=key=value,key=value"`` adds runs of ``--after`` with those params changed (to
separate what the thread count and warm start give from the rest).

The runs must do the same work: the script compares the params that set the amount of work (prompts,
samples, tokens, epochs, model shape, rounds) across the revisions and stops if they differ.  Writes
benchmarks/results/repro_speedup.json and .md.  Not a test: nothing passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, dvc_executable, machine, run, summary, write_report

# The params that set the amount of work of a default `dvc repro`.
WORK_KEYS = ("task", "seed", "prepare.num_builtin_prompts", "prepare.eval_fraction", "sft.tiny", "sft.epochs",
             "sft.batch_size", "sft.max_length", "sft.num_builtin_demonstrations", "rollout.prompts_per_round",
             "rollout.samples_per_prompt", "rollout.max_new_tokens", "optim.epochs", "optim.minibatch_size",
             "algorithm.name", "evaluate.num_prompts", "evaluate.samples_per_prompt", "evaluate.max_new_tokens",
             "evaluate.num_perplexity_texts", "rounds")


# Where a work key lived before it moved (a revision older than the optim: section keeps it under ppo:).
FORMER_KEYS = {"optim.epochs": "ppo.epochs", "optim.minibatch_size": "ppo.minibatch_size"}


def lookup(params: dict, dotted: str):
    if dotted in FORMER_KEYS and isinstance(params.get("ppo"), dict) and "epochs" in params["ppo"]:
        dotted = FORMER_KEYS[dotted]
    value = params
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def clone(revision: str, target: Path) -> None:
    run(["git", "clone", "-q", str(REPO), str(target)], REPO)
    run(["git", "checkout", "-q", revision], target)


def read_params(directory: Path) -> dict:
    import yaml

    return yaml.safe_load((directory / "params.yaml").read_text())


def set_params(directory: Path, changes: dict[str, str]) -> None:
    """Edit params.yaml in place the way `dvc exp run -S key=value` does (YAML values)."""
    import yaml

    params = read_params(directory)
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def timed_repro(revision: str, changes: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory(prefix="rlhf-speedup-") as tmp:
        work = Path(tmp) / "repo"
        clone(revision, work)
        if changes:
            set_params(work, changes)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "RLHF_"))}
        started = time.perf_counter()
        result = subprocess.run([dvc_executable(), "repro"], cwd=work, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"dvc repro at {revision} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return seconds


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    label, _, assignments = text.partition("=")
    changes = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return label.strip(), changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="0142298", help="revision before the change (default: before issue 5)")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[], help='"LABEL=key=value,key=value": runs of --after '
                                                                        "with those params changed")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    revisions = {name: run(["git", "rev-parse", "--short", rev], REPO)[0].strip()
                 for name, rev in (("before", args.before), ("after", args.after))}
    runs = [(f"{revisions['before']} (before)", revisions["before"], {}),
            (f"{revisions['after']} (after)", revisions["after"], {})]
    runs += [(label, revisions["after"], changes) for label, changes in map(parse_variant, args.variant)]

    with tempfile.TemporaryDirectory() as tmp:  # the same work: compare the work-setting params
        seen = {}
        for index, (label, revision, changes) in enumerate(runs):
            directory = Path(tmp) / str(index)
            clone(revision, directory)
            set_params(directory, changes)
            seen[label] = {key: lookup(read_params(directory), key) for key in WORK_KEYS}
        first = next(iter(seen.values()))
        for label, work in seen.items():
            differing = {key: (first[key], work[key]) for key in WORK_KEYS if first[key] != work[key]}
            if differing:
                sys.exit(f"{label} does different work from {runs[0][0]}: {differing}")

    walls: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    for repeat in range(args.repeats):
        for label, revision, changes in runs:
            seconds = timed_repro(revision, changes)
            walls[label].append(seconds)
            print(f"run {repeat + 1}/{args.repeats} {label}: {seconds:.1f} s", flush=True)

    command = "python benchmarks/repro_speedup.py" + "".join(f' --variant "{v}"' for v in args.variant)
    report = {"machine": machine(), "command": command, "repeats": args.repeats,
              "work": ", ".join(f"{key} {json.dumps(first[key])}" for key in ("rollout.prompts_per_round",
                                "rollout.samples_per_prompt", "rollout.max_new_tokens", "sft.epochs", "optim.epochs"))
              + f", {len(first['rounds'])} rounds",
              "runs": [{"label": label, "revision": revision, "params_changes": changes, "wall_s": summary(walls[label], 1),
                        "walls_s": [round(w, 1) for w in walls[label]]} for label, revision, changes in runs]}
    from rlhf_core.tooling.docs import speedup_lines

    write_report(args.out, "repro_speedup", report, lambda path: "\n".join(speedup_lines(json.loads(path.read_text()))))


if __name__ == "__main__":
    main()
