"""Wall time of the stages behind one MLflow run.

When DVC runs a stage (it sets DVC_STAGE), ``run_stage`` appends the stage's wall time to
``tracking/stage_times.jsonl`` in the stage's working directory.  That file is git-ignored and no
stage's output, so it changes no output, hash or cache.  The track stage logs the times as MLflow
metrics (``time.total_s`` and one ``time.<stage>_s`` per stage) and empties the file.  A run's wall
time is therefore the time of the stages that ran to produce it.  Stages that DVC kept or restored
from its cache count 0.
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


def record(stage: str, seconds: float, workdir: Path | None = None) -> None:
    """Append one finished stage's wall time (only under DVC; never fails the stage)."""
    # track logs and clears the others' times; its own time would land in the next run.
    if not os.environ.get("DVC_STAGE") or stage == "track":
        return
    path = (workdir or Path.cwd()) / FILE
    with contextlib.suppress(OSError):  # a read-only or full disk must not fail a finished stage
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps({"stage": stage, "seconds": round(seconds, 3)}) + "\n")


def read(workdir: Path) -> dict[str, float]:
    """{stage: seconds} of the stages recorded since the last track (a re-run stage's times are summed)."""
    path = workdir / FILE
    times: dict[str, float] = {}
    if not path.is_file():
        return times
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            times[str(entry["stage"])] = times.get(str(entry["stage"]), 0.0) + float(entry["seconds"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a killed stage
    return times


def clear(workdir: Path) -> None:
    (workdir / FILE).unlink(missing_ok=True)


def metric_name(stage: str) -> str:
    """MLflow metric name of a stage's time: rollout@r1 -> time.rollout_r1_s."""
    return "time." + re.sub(r"[^\w.\- /]", "_", stage) + "_s"
