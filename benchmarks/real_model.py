"""Time per round of the real-model recipe's CPU variant, on a locally built model of the real model's shape.

    python benchmarks/real_model.py [--shape smollm2-135m] [--out benchmarks/results]

`examples/params.smollm2-instruct.yaml` with the CPU variant of docs/bring-your-own.md (fewer prompts, shorter
responses, no autocast, VADER as the reward), its `sft.model` pointed at a model written by ``rlhf_core.tooling.local_models``:
SmolLM2-135M-Instruct's shape (30 blocks, width 576, 49,152-token vocabulary, tied head) and tokenizer
quirks (ChatML, pad == eos, two end ids), with random weights (the Hub is out of reach here).  `dvc repro`
runs 2 rounds; the report is each stage's own time (`<stage>: done in …`), per round.  Random weights
generate until max_new_tokens more often than the real model would, so generation here is a worst case.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import (
    REPO,
    checkpoint_parameters,
    copy_repo,
    deep_update,
    dvc_executable,
    machine,
    run,
    stage_seconds,
    write_params,
    write_report,
)

CPU_VARIANT = {  # what the CPU variant (docs/bring-your-own.md) changes in the example
    "device": "cpu", "cpu_threads": 0,
    "compute": {"mixed_precision": "no"},
    "rollout": {"prompts_per_round": 16, "samples_per_prompt": 4, "max_new_tokens": 32, "batch_size": 64,
                "forward_batch_size": 16},
    "score": {"scorers": [{"name": "sentiment", "kind": "vader"}], "missing_eos_penalty": 1.0},
    "optim": {"epochs": 2, "minibatch_size": 32, "micro_batch_size": 8},
    "evaluate": {"num_prompts": 16, "samples_per_prompt": 1, "max_new_tokens": 32, "num_perplexity_texts": 20},
    "rounds": {"r1": {"from": "sft"}, "r2": {"from": "r1"}},
}
ROUND_STAGES = ("rollout", "score", "advantages", "optimize")


def render(path: Path) -> str:
    from rlhf_core.tooling.docs import markdown_table

    report = json.loads(path.read_text())
    rows = [[key, *(f"{report['rounds'][key].get(stage, 0):.1f}" for stage in ROUND_STAGES),
             f"{sum(report['rounds'][key].values()):.1f}"] for key in report["rounds"]]
    return "\n".join([
        f"The CPU variant of the recipe on a locally built model of {report['shape']}'s shape "
        f"({report['parameters'] / 1e6:.0f}M parameters, random weights); {report['machine']} "
        "(`python benchmarks/real_model.py`). Seconds of each stage's own work:", "",
        *markdown_table(["round", *ROUND_STAGES, "round total"], rows), "",
        f"sft (snapshot + held-out perplexity): {report['other'].get('sft', 0):.1f} s; evaluate (3 checkpoints): "
        f"{report['other'].get('evaluate', 0):.1f} s; the whole `dvc repro`: {report['wall_seconds']:.0f} s."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from rlhf_core.tooling.local_models import write_local_model

    with tempfile.TemporaryDirectory() as tmp:
        model = write_local_model(Path(tmp) / "model", args.shape)
        parameters = checkpoint_parameters(model)
        work = Path(tmp) / "repo"
        work.mkdir()
        copy_repo(work)
        changes = {**CPU_VARIANT, "sft": {"model": str(model)}}
        write_params(REPO / "examples/params.smollm2-instruct.yaml", work / "params.yaml",
                     lambda raw: deep_update(raw, changes, replace=("rounds", "score")))
        run(["git", "commit", "-qam", "recipe, CPU variant"], work)
        output, wall = run([dvc_executable(), "repro"], work)
        seconds = stage_seconds(output)
    print(output[-2000:], file=sys.stderr)
    rounds = {key: {stage: seconds.get(f"{stage}@{key}", 0.0) for stage in ROUND_STAGES} for key in ("r1", "r2")}
    other = {name: seconds.get(name, 0.0) for name in ("prepare", "sft", "track")}
    other["evaluate"] = sum(value for name, value in seconds.items() if name.startswith(("evaluate", "eval_summary")))
    report = {"machine": machine(), "shape": args.shape, "parameters": parameters, "rounds": rounds, "other": other,
              "wall_seconds": round(wall, 1)}
    write_report(args.out, "real_model", report, render)


if __name__ == "__main__":
    main()
