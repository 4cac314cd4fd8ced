"""What the benchmark scripts share: a clean copy of the repository to run DVC in, and timed commands."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run(command: list[str], cwd: Path) -> tuple[str, float]:
    """Run a command (exit with its output on failure); return (stdout + stderr, wall seconds)."""
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@example.com")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout + result.stderr, time.perf_counter() - started


def copy_repo(target: Path, params_changes: dict | None = None) -> None:
    """A git repository at ``target`` with this repo's files, minus results, plus ``params_changes``."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name == "dvc.lock" or name.startswith(("metrics/", "plots/", "samples/")) or not (REPO / name).is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)
    if params_changes:
        write_params(target / "params.yaml", target / "params.yaml", lambda raw: raw.update(params_changes))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark"]):
        run(["git", *args], target)


def deep_update(base: dict, changes: dict, replace: tuple[str, ...] = ()) -> dict:
    """Merge ``changes`` into the params dict ``base`` in place, section by section; a key named in ``replace`` (at
    any depth) takes the new value whole.  Returns ``base``."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key not in replace:
            deep_update(base[key], value, replace)
        else:
            base[key] = value
    return base


def write_params(source: Path, target: Path, edit) -> None:
    """Read the params file ``source`` as DVC does, let ``edit(raw dict)`` change it in place, validate,
    and write the result to ``target``."""
    from rlhf_core.config import params_from_dict, yaml_load
    from rlhf_core.config.rendering import render_params_yaml

    raw = yaml_load(source.read_text())
    edit(raw)
    target.write_text(render_params_yaml(params_from_dict(raw)))


def summary(values: list[float], digits: int = 3) -> dict:
    """Median and min–max spread of repeated measurements."""
    import statistics

    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": len(values)}


def write_report(out_dir: Path, name: str, report: dict, render) -> None:
    """Write <name>.json, then the docs block ``render`` makes of it as <name>.md, and print the block."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    block = render(out_dir / f"{name}.json")
    (out_dir / f"{name}.md").write_text(block + "\n")
    print(block)


def stage_seconds(output: str) -> dict[str, float]:
    """{stage: seconds} from the stages' own `<stage>: done in <s>s …` lines."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+): done in ([\d.]+)s", output, re.M)}


def stage_startup(output: str) -> dict[str, tuple[float, float]]:
    """{stage: (start-up seconds, work seconds)} from the `… (start-up <s>s + work <s>s)` of the stages' last lines."""
    return {m.group(1): (float(m.group(2)), float(m.group(3))) for m in
            re.finditer(r"^(\S+): done in [\d.]+s \(start-up ([\d.]+)s \+ work ([\d.]+)s\)", output, re.M)}


def dvc_executable() -> str:
    return shutil.which("dvc") or sys.exit("dvc is not installed")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def round_keys(evaluation: dict) -> list[str]:
    """The round keys of metrics/eval.json in round order (sft excluded)."""
    return sorted((k for k in evaluation if k != "sft"), key=lambda k: (len(k), k))


def checkpoint_parameters(directory: Path) -> int:
    """The number of parameters stored in a checkpoint directory's model.safetensors (a tied head counted once)."""
    import math

    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        return sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())


def moved_checkpoint(source: Path, target: Path, scale: float, seed: int) -> Path:
    """A full checkpoint as optimize writes it (policy, tokenizer, value head at the root), its weights moved by
    Gaussian noise of ``scale``: a stand-in for the next round's checkpoint."""
    import torch

    from rlhf_core.model.checkpoints import load_actor_critic, save_checkpoint
    from rlhf_core.model.loading import load_tokenizer

    actor_critic = load_actor_critic(str(source), "value_head", torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in actor_critic.policy.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator, dtype=torch.float32).to(weight.dtype) * scale)
    save_checkpoint(target, actor_critic, load_tokenizer(str(source)), {"round": "benchmark"})
    return target
