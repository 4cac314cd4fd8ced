"""`rlhf`: the daily commands around the pipeline (installed as a console script).

    rlhf rounds N                 rewrite params.yaml's `rounds` for N chained rounds (rest of the file kept)
    rlhf compare [RUN ...]        table of MLflow runs: the params that differ, final reward, KL, perplexity, wall time
    rlhf samples ROUND [--worst N | --best N | --random N]
                                  prompts, responses and every reward component of a round's rollouts
    rlhf plot [RUN ...]           PNGs of reward and KL by round and the reward-vs-KL frontier, logged to the runs
    rlhf exps [DVC ARGS ...]      `dvc exp show` with the params that differ and the summary metrics only
    rlhf engine status|stop       the warm vLLM engine of rollout.engine: vllm: where it runs, or stop it

Every problem a person can fix (no params.yaml, no MLflow store, an unknown run or round) ends the
command with one line on stderr and exit code 2.  Only argparse is imported here; each subcommand
imports what it needs (mlflow, matplotlib, pandas) when it runs, so `rlhf --help` is fast.
"""

from __future__ import annotations

import argparse
import sys

from rlhf_core.errors import RLHFError
from rlhf_core.tooling.commands._common import DEFAULT_SAMPLES

DEFAULT_LATEST = 5


def add_run_selection(parser: argparse.ArgumentParser) -> None:
    """RUN ... and -n/--latest: the MLflow runs a command works on (compare, plot)."""
    parser.add_argument("runs", nargs="*", metavar="RUN", help="MLflow run id, id prefix (e.g. the 8 characters "
                        "`compare` shows) or run name; default: the latest runs")
    parser.add_argument("-n", "--latest", type=int, default=DEFAULT_LATEST,
                        help=f"without RUN: how many of the latest runs (default {DEFAULT_LATEST})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description="Daily commands for the RLHF pipeline: run it with `dvc repro`, then look with these.")
    parser.add_argument("--params", default=None,
                        help="params file (default: params.yaml at the repository root, found from the current directory)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    rounds = commands.add_parser(
        "rounds", help="set the number of RL rounds in params.yaml",
        description="Rewrite the `rounds` mapping of params.yaml for N rounds (r1 from sft, r2 from r1, ...). "
                    "Every other line of the file, comments included, stays as it is; existing round lines "
                    "that already match are kept. Then `dvc repro` trains only the new rounds.")
    rounds.add_argument("n", type=int, metavar="N", help="number of rounds (>= 1)")

    compare = commands.add_parser(
        "compare", help="compare MLflow runs: differing params, final reward, KL, perplexity, wall time",
        description="Print a table of MLflow runs of the experiment in params.yaml (tracking.experiment): short run "
                    "id, name, start time, only the params that differ between the runs, the eval reward, KL and "
                    "perplexity of each run's last round, and the wall time of the stages that ran for it.")
    add_run_selection(compare)

    samples = commands.add_parser(
        "samples", help="print a round's prompts, responses and reward components",
        description="Print prompts, responses and every reward component of a round, from "
                    "rollouts/ROUND/rollouts.parquet joined with scores/ROUND/scores.parquet. "
                    f"Default: {DEFAULT_SAMPLES} random samples (--seed 0).")
    samples.add_argument("round", metavar="ROUND", help="round key, e.g. r1 (one with rollouts on disk)")
    pick = samples.add_mutually_exclusive_group()
    pick.add_argument("--worst", type=int, metavar="N", help="the N samples with the lowest total reward, lowest first")
    pick.add_argument("--best", type=int, metavar="N", help="the N samples with the highest total reward, highest first")
    pick.add_argument("--random", type=int, metavar="N", help=f"N random samples (the default, N = {DEFAULT_SAMPLES})")
    samples.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    samples.add_argument("--width", type=int, default=None, help="wrap text at this many columns (default: terminal width)")

    plot = commands.add_parser(
        "plot", help="write PNG plots of runs and log them to MLflow",
        description="Write reward_vs_round.png, kl_vs_round.png and reward_vs_kl.png (one line per run, the "
                    "reward-vs-KL frontier across the runs) and log each to every chosen run as an MLflow artifact "
                    "under rlhf_plot/.")
    add_run_selection(plot)
    plot.add_argument("--out", default=None, help="folder for the PNGs (default: plots/png at the repository root)")
    plot.add_argument("--no-log", action="store_true", help="only write the PNGs; log nothing to MLflow")

    commands.add_parser(
        "exps", help="dvc exp show as a readable table: the params that differ and the summary metrics",
        description="Run `dvc exp show --only-changed` at the repository root without the dependency-hash columns "
                    "(one per file any stage depends on). Other arguments go to dvc exp show, e.g. --csv, -A, "
                    "--sort-by reward.")
    engine = commands.add_parser(
        "engine", help="the warm vLLM engine (rollout.engine: vllm): status, or stop it",
        description="rollout.engine: vllm keeps one engine running across rounds (it stops by itself after "
                    "vllm.idle_timeout_s without a request). `status` says where it listens and what it serves; "
                    "`stop` stops it now.")
    engine.add_argument("action", choices=("status", "stop"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "exps":  # only exps passes unknown arguments on (to dvc exp show)
        parser.parse_args(argv)  # argparse's own message and exit code 2
    args.dvc_args = extra
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "rounds":
            from rlhf_core.tooling.commands.rounds import run
        elif args.command == "compare":
            from rlhf_core.tooling.commands.compare import run
        elif args.command == "samples":
            from rlhf_core.tooling.commands.samples import run
        elif args.command == "exps":
            from rlhf_core.tooling.commands.exps import run
        elif args.command == "engine":
            from rlhf_core.tooling.commands.engine import run
        else:
            from rlhf_core.tooling.commands.plot import run
        code = run(args)
    except RLHFError as exc:
        print(f"error: rlhf {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `rlhf samples r1 | head`
        sys.stderr.close()
        return 0
    return code or 0
