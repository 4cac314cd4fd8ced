"""What every stage script shares: argument parsing, validated params, and errors for people.

A stage is ``run_stage(main, needs_round=...)`` where ``main(params, args)`` does the work.  Any
RLHFError (bad param, missing or corrupt file) or FloatingPointError (a NaN/inf guard) ends the stage
with one line on stderr and exit code 2; because outputs are written atomically, nothing partial is
left behind.
"""

from __future__ import annotations

import argparse
import sys
import time

from rlhf_core.errors import RLHFError


_CURRENT = {"stage": None, "ready": False}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ready() -> None:
    """Called by a stage once its inputs and models are loaded: logs its start-up time (interpreter,
    imports, loading), from the process start (the launcher's, under warm start), once."""
    from rlhf_core.stage_times import process_started

    started = process_started()
    if started is None or _CURRENT["ready"]:
        return
    _CURRENT["ready"] = True
    log(f"{_CURRENT['stage']}: started up in {time.time() - started:.2f}s (interpreter, imports, loading)")


def run_stage(main, *, name: str, needs_round: bool = False, argv: list[str] | None = None,
              add_arguments=None) -> None:
    from rlhf_core.config import load_params

    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=(main.__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if needs_round:
        parser.add_argument("--round", required=True, help="round key from params.yaml `rounds`, e.g. r1")
    if add_arguments is not None:  # a stage's own options, e.g. train_reward --name
        add_arguments(parser)
    args = parser.parse_args(argv)
    tag = args.round if needs_round else getattr(args, "name", None)  # round key, or e.g. the reward model's name
    where = f"{name}@{tag}" if tag else name
    _CURRENT.update(stage=where, ready=False)
    started = time.perf_counter()
    try:
        params = load_params(args.params)
        if needs_round:
            params.round_index(args.round)  # validates the key
        main(params, args)
        from rlhf_core.stage_times import record

        record(where, time.perf_counter() - started)  # under DVC only: the run's wall time (track logs it)
    except (RLHFError, FloatingPointError) as exc:  # FloatingPointError: a NaN/inf guard tripped
        print(f"error: {where}: {exc}", file=sys.stderr)
        sys.exit(2)
    log(f"{where}: done in {time.perf_counter() - started:.1f}s")
