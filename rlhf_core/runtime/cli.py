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

_CURRENT: dict = {"process_started": None, "ready_at": None}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ready() -> None:
    """Called by a stage once its inputs and models are loaded: the end of its start-up (interpreter,
    imports, loading), which the stage's last line reports next to its work."""
    if _CURRENT["ready_at"] is None:
        _CURRENT["ready_at"] = time.time()


def timing_summary(elapsed: float, measures: dict | None = None) -> str:
    """`done in 2.1s` plus, for a stage that is its process's program, `(start-up 0.41s + work 1.65s)`:
    start-up from the process start (the launcher's, under warm start) to ``ready()``, work from there; then
    the stage's ``measures`` (tokens/s, peak memory), e.g. `; generation 1520 tokens/s; peak RSS 612 MB`."""
    started, ready_at = _CURRENT["process_started"], _CURRENT["ready_at"]
    text = f"done in {elapsed:.1f}s"
    if started is not None and ready_at is not None:
        text += f" (start-up {ready_at - started:.2f}s + work {time.time() - ready_at:.2f}s)"
    for name, value in (measures or {}).items():  # generation_tokens_per_s → `generation 1520 tokens/s`
        what, _, unit = name.removesuffix("_per_s").rpartition("_")
        text += f"; peak RSS {value:.0f} MB" if name == "peak_rss_mb" else f"; {what.replace('_', ' ')} {value:.0f} {unit}/s"
    return text


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the quota) is full: an OSError with ENOSPC/EDQUOT, or a library's error
    that wraps one (safetensors: ``IoError(Os { code: 28, kind: StorageFull, … })``)."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


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
    # round key, or e.g. the reward model's name or the evaluated checkpoint
    tag = args.round if needs_round else getattr(args, "name", None) or getattr(args, "checkpoint", None)
    where = f"{name}@{tag}" if tag else name
    # Start-up is measured for a stage that is its process's program (argv from the command line), not for
    # one called in process (tests, notebooks), whose process started long before the stage.
    from rlhf_core.runtime import stage_times

    _CURRENT.update(ready_at=None, process_started=stage_times.process_started() if argv is None else None)
    stage_times.reset_work()
    started = time.perf_counter()
    try:
        params = load_params(args.params)
        if needs_round:
            params.round_index(args.round)  # validates the key
        main(params, args)
        measures = stage_times.work_rates()
        peak = stage_times.peak_rss_mb() if argv is None else None  # only when the stage is its process's program
        if peak is not None:
            measures["peak_rss_mb"] = peak
        # under DVC only: the run's wall time and measures (track logs them)
        stage_times.record(where, time.perf_counter() - started, measures=measures)
    except (RLHFError, FloatingPointError) as exc:  # FloatingPointError: a NaN/inf guard tripped
        print(f"error: {where}: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        if not disk_full(exc):
            raise
        print(f"error: {where}: no space left on the device while writing its outputs ({exc.__class__.__name__}); "
              "nothing was replaced: free space (the DVC cache: dvc gc) and run it again", file=sys.stderr)
        sys.exit(2)
    log(f"{where}: {timing_summary(time.perf_counter() - started, measures)}")
    distributed = sys.modules.get("rlhf_core.runtime.distributed")  # imported only by stages that may run as ranks
    if argv is None and distributed is not None and distributed.left_a_process_group():
        distributed.leave_process(0)  # a rank's interpreter teardown can abort after a finished stage
