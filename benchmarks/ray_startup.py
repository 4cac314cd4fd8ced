"""What the Ray launcher costs per distributed stage against the local launcher, on the default round r1.

    python benchmarks/ray_startup.py [--runs 3] [--out benchmarks/results]

A copy of the repository runs the default pipeline up to optimize@r1 (one process).  Then rollout@r1 and
optimize@r1 run again through the stage launcher, interleaved, --runs times each, under:

- local: compute.num_processes: 2 (`accelerate launch`, 2 gloo processes on this machine);
- ray:   compute.launcher: ray, 2 members × 1 process, one per node of a 2-node loopback cluster
         (rlhf_core/tooling/loopback_ray.py), which give the local launcher's bytes.

The same work, so the difference of the wall times is what Ray adds: connecting, placing the gang, starting the
actors.  Writes ray_startup.json and ray_startup.md (a table for docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copy_repo, dvc_executable, machine, run, summary, write_params, write_report  # noqa: E402

STAGES = ("rollout", "optimize")


def render(path: Path) -> str:
    report = json.loads(path.read_text())
    lines = ["| stage (default round r1) | local, 2 processes (s) | Ray, 2 members × 1, 2 nodes (s) | Ray adds (s) |",
             "|---|---|---|---|"]
    for stage in STAGES:
        local, ray = report["local"][stage], report["ray"][stage]
        lines.append(f"| {stage} | {local['median']:.1f} ({local['min']:.1f}–{local['max']:.1f}) | "
                     f"{ray['median']:.1f} ({ray['min']:.1f}–{ray['max']:.1f}) | {ray['median'] - local['median']:+.1f} |")
    lines.append("")
    lines.append(f"Wall time of `python -m rlhf_core.runtime.launch stages.<stage> --round r1`, median (min–max) of "
                 f"{report['runs']} interleaved runs; {report['machine']}; `python benchmarks/ray_startup.py`.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    from rlhf_core.tooling.loopback_ray import LoopbackCluster

    work = Path(tempfile.mkdtemp(prefix="ray_startup_")) / "repo"
    copy_repo(work)
    run([dvc_executable(), "repro", "optimize@r1"], work)
    cluster = LoopbackCluster(Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")))
    settings = {"local": {"launcher": "local", "num_processes": 2, "num_machines": 1},
                "ray": {"launcher": "ray", "ray_address": cluster.address, "ray_placement": "spread",
                        "num_processes": 1, "num_machines": 2}}
    seconds: dict[str, dict[str, list[float]]] = {name: {stage: [] for stage in STAGES} for name in settings}
    try:
        for _ in range(args.runs):
            for name, compute in settings.items():
                write_params(work / "params.yaml", work / "params.yaml", lambda raw: raw["compute"].update(compute))
                for stage in STAGES:
                    started = time.perf_counter()
                    run([sys.executable, "-m", "rlhf_core.runtime.launch", f"stages.{stage}", "--round", "r1"], work)
                    seconds[name][stage].append(time.perf_counter() - started)
    finally:
        cluster.stop()
    report = {"machine": machine(), "runs": args.runs,
              **{name: {stage: summary(values, 2) for stage, values in by_stage.items()}
                 for name, by_stage in seconds.items()}}
    write_report(args.out, "ray_startup", report, render)


if __name__ == "__main__":
    main()
