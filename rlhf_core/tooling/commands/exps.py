"""rlhf exps: `dvc exp show` as a table a person reads.

Plain `dvc exp show` has a column for the hash of every file and directory any stage depends on (the code,
the models, the rollouts...) besides the params and metrics: about 2,800 characters wide on this pipeline.
This runs it with ``--only-changed`` (the params that differ between experiments) and drops the dependency
columns by name, keeping the summary metrics (metrics/summary.json: reward, its gain over SFT, KL, ...).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from rlhf_core.tooling.commands._common import root

# The dependency columns: every path a stage of dvc.yaml depends on starts with one of these.
EXP_SHOW_DROP = ("^(fingerprints|rlhf_core|stages|configs|models|rollouts|scores|advantages|evals|prompts|demos|metrics|plots|"
                 "samples|reward_models)(/|$)")


def command(extra: list[str]) -> list[str]:
    """The `dvc exp show` command line, with ``extra`` arguments passed on (e.g. --csv, -A, --sort-by reward)."""
    dvc = shutil.which("dvc")
    return [*([dvc] if dvc else [sys.executable, "-m", "dvc"]), "exp", "show", "--only-changed", "--drop",
            EXP_SHOW_DROP, *extra]


def run(args) -> int:
    return subprocess.call(command(args.dvc_args), cwd=root())
