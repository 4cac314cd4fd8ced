"""DVC's own time per stage at real checkpoint sizes, under the default cache (copy) and link-based caches.

    python benchmarks/dvc_cost.py [--sizes 0.5,2] [--runs 3] [--out benchmarks/results]

A scratch git + DVC repository holds one stage that writes a checkpoint of the given size (random bytes, as
incompressible as weights) the way the pipeline writes its outputs: into a temporary directory, then renamed
into place (rlhf_core.io.atomic_dir).  For each size and `cache.type` (copy: DVC's default on a filesystem
without reflinks, as ext4; reflink,copy; hardlink; symlink), interleaved, `--runs` times: the wall time of
`dvc repro -f` minus the stage's own time (which it writes down) is what DVC costs around it: hashing the new
output, putting it into the cache, linking or copying it back, writing dvc.lock.

Writes dvc_cost.json and dvc_cost.md (the table of docs/performance.md#dvc-at-real-checkpoint-sizes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import dvc_executable, machine, run, summary, write_report  # noqa: E402

CACHE_TYPES = ("copy", "reflink,copy", "hardlink", "symlink")
STAGE = '''import json, os, sys, time
from pathlib import Path
started = time.perf_counter()
from rlhf_core.io import atomic_dir
size = int(float(sys.argv[1]) * (1 << 30))
with atomic_dir("out") as directory:
    with open(Path(directory) / "model.safetensors", "wb") as handle:
        block = os.urandom(1 << 24)
        for offset in range(0, size, len(block)):
            handle.write(block[: min(len(block), size - offset)] + os.urandom(8))
Path("stage_seconds.txt").write_text(str(time.perf_counter() - started))
'''


def scratch_repo(root: Path, size_gb: float, cache_type: str) -> Path:
    repo = root / f"{size_gb}GB-{cache_type.replace(',', '_')}"
    repo.mkdir(parents=True)
    (repo / "write.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(f"stages:\n  write:\n    cmd: {sys.executable} write.py {size_gb}\n"
                                   "    deps: [write.py]\n    outs: [out]\n")
    (repo / ".gitignore").write_text("stage_seconds.txt\n")
    for command in (["git", "init", "-q"], [dvc_executable(), "init", "-q"],
                    [dvc_executable(), "config", "core.analytics", "false"]):
        run(command, repo)
    if cache_type != "copy":
        run([dvc_executable(), "config", "cache.type", cache_type], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "scratch"], repo)
    return repo


def render(path: Path) -> str:
    report = json.loads(path.read_text())
    lines = ["| checkpoint | cache.type | `dvc repro -f` wall (s) | the stage's own (s) | DVC's own (s) | disk after (GB) |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['size_gb']} GB | {row['cache_type']} | {row['wall_s']['median']:.1f} | "
                     f"{row['stage_s']['median']:.1f} | {row['dvc_s']['median']:.1f} "
                     f"({row['dvc_s']['min']:.1f}–{row['dvc_s']['max']:.1f}) | {row['disk_gb']:.1f} |")
    lines += ["", f"Median (min–max) of {report['runs']} interleaved runs; disk: workspace and cache together after the "
              f"runs (a link costs nothing, a copy the checkpoint again). {report['machine']}, {report['filesystem']}; "
              "`python benchmarks/dvc_cost.py`."]
    return "\n".join(lines)


def disk_gb(repo: Path) -> float:
    """Bytes the repository's blocks take (hard links counted once), in GB."""
    output = subprocess.run(["du", "-s", "--block-size=1", str(repo)], capture_output=True, text=True).stdout
    return int(output.split()[0]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5,2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dvc_cost_"))
    sizes = [float(size) for size in args.sizes.split(",")]
    filesystem = subprocess.run(["df", "--output=fstype", str(root)], capture_output=True, text=True).stdout.split()[-1]
    rows = []
    try:
        for size in sizes:
            repos = {cache_type: scratch_repo(root, size, cache_type) for cache_type in CACHE_TYPES}
            measured = {cache_type: {"wall_s": [], "stage_s": [], "dvc_s": []} for cache_type in CACHE_TYPES}
            for _ in range(args.runs):
                for cache_type, repo in repos.items():
                    started = time.perf_counter()
                    run([dvc_executable(), "repro", "-f"], repo)
                    wall = time.perf_counter() - started
                    stage = float((repo / "stage_seconds.txt").read_text())
                    for key, value in (("wall_s", wall), ("stage_s", stage), ("dvc_s", wall - stage)):
                        measured[cache_type][key].append(value)
                    print(size, cache_type, round(wall, 2), round(stage, 2), flush=True)
            for cache_type, repo in repos.items():
                rows.append({"size_gb": size, "cache_type": cache_type, "disk_gb": disk_gb(repo),
                             **{key: summary(values, 2) for key, values in measured[cache_type].items()}})
            for repo in repos.values():
                shutil.rmtree(repo)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"machine": machine(), "filesystem": filesystem, "runs": args.runs, "rows": rows}
    write_report(args.out, "dvc_cost", report, render)


if __name__ == "__main__":
    main()
