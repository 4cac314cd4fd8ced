"""Wall time, throughput and peak memory of the stages behind one MLflow run.

When DVC runs a stage (it sets DVC_STAGE), ``run_stage`` appends the stage's wall time to
``tracking/stage_times.jsonl`` in the stage's working directory, with its measures: the rates of the work it
counted with ``add_work`` (generation tokens/s in rollout and evaluate, training tokens/s in optimize, steps/s
in sft) and its process's peak resident memory (VmHWM).  That file is git-ignored and no stage's output, so these
machine-dependent numbers change no output, hash or cache.  The track stage logs them as MLflow metrics
(``time.total_s``, one ``time.<stage>_s`` per stage, ``perf.<stage>.<measure>``) and empties the file.  A run's
wall time is therefore the time of the stages that ran to produce it.  Stages that DVC kept or restored from
its cache count 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

FILE = Path("tracking/stage_times.jsonl")
STARTED_ENV = "RLHF_STAGE_STARTED"  # set by the warm-start client for the stage it hands over


def process_started() -> float | None:
    """Epoch seconds at which this stage's process started; under warm start, the launching client's.

    Linux: /proc/self/stat (start time in clock ticks since boot) against /proc/uptime, both to 10 ms;
    None elsewhere."""
    if os.environ.get(STARTED_ENV):
        return float(os.environ[STARTED_ENV])
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


_WORK: dict[str, list[float]] = {}  # this stage's counted work: name -> [amount, seconds]


def reset_work() -> None:
    _WORK.clear()


def add_work(name: str, amount: float, seconds: float) -> None:
    """Count ``amount`` units of ``name`` (e.g. generation_tokens) done in ``seconds`` by the running stage."""
    done = _WORK.setdefault(name, [0.0, 0.0])
    done[0] += amount
    done[1] += seconds


def work_rates() -> dict[str, float]:
    """{<name>_per_s: amount / seconds} of the work counted since the stage started."""
    return {f"{name}_per_s": amount / seconds for name, (amount, seconds) in _WORK.items() if seconds > 0}


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM) in MB; None where /proc is missing.  A stage forked by the
    warm-start server counts from the pages it shares with the server at the fork (the preloaded libraries)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def record(stage: str, seconds: float, workdir: Path | None = None, measures: dict | None = None) -> None:
    """Append one finished stage's wall time and ``measures`` (only under DVC; never fails the stage)."""
    # track logs and clears the others' times; its own time would land in the next run.
    if not os.environ.get("DVC_STAGE") or stage == "track":
        return
    path = (workdir or Path.cwd()) / FILE
    with contextlib.suppress(OSError):  # a read-only or full disk must not fail a finished stage
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps({"stage": stage, "seconds": round(seconds, 3),
                                     **({"measures": measures} if measures else {})}) + "\n")


def _entries(workdir: Path) -> list[tuple[str, float, dict[str, float]]]:
    """(stage, seconds, measures) of every well-formed line recorded since the last track; a line cut short by a
    killed stage is skipped."""
    path = workdir / FILE
    entries = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                entry = json.loads(line)
                entries.append((str(entry["stage"]), float(entry["seconds"]),
                                {str(k): float(v) for k, v in entry.get("measures", {}).items()}))
    return entries


def read(workdir: Path) -> dict[str, float]:
    """{stage: seconds} of the stages recorded since the last track (a re-run stage's times are summed)."""
    times: dict[str, float] = {}
    for stage, seconds, _ in _entries(workdir):
        times[stage] = times.get(stage, 0.0) + seconds
    return times


def read_measures(workdir: Path) -> dict[str, dict[str, float]]:
    """{stage: {measure: value}} recorded since the last track (a re-run stage's latest)."""
    measures = {stage: values for stage, _, values in _entries(workdir)}
    return {stage: values for stage, values in measures.items() if values}


def clear(workdir: Path) -> None:
    (workdir / FILE).unlink(missing_ok=True)


def metric_name(stage: str, measure: str | None = None) -> str:
    """MLflow metric name of a stage's time (rollout@r1 -> time.rollout_r1_s) or of one of its measures
    (perf.rollout_r1.generation_tokens_per_s)."""
    name = re.sub(r"[^\w.\- /]", "_", stage)
    return f"time.{name}_s" if measure is None else f"perf.{name}.{measure}"
