"""What compute.param_dtype × cpu_isa cost the pipeline's own stages on a real-size model: sft steps/s and one
optimize round (rollout, score, advantages, optimize), run by `dvc repro` as a user runs them.

    python benchmarks/cpu_dtype_stages.py [--runs 3] [--out benchmarks/results]

The model is a locally built one of SmolLM2-135M's shape (49,152-token vocabulary, 30 blocks, width 576, head_dim
64; random weights, stored in float32), the default params otherwise, reduced so that the slowest combination
(bf16 weights under the AVX2 pin) fits: SFT is 3 steps of 8 demonstrations of 32 tokens; the round is 4 prompts ×
2 responses of 16 new tokens and one PPO epoch.  Each (run, combination) is a fresh copy of one workspace in which
`prepare` ran, so each `dvc repro optimize@r1` runs sft and the round with that combination; the 4 combinations
are interleaved, `--runs` times.  Reported: sft's steps/s (the stage's ``sft_steps_per_s`` measure: the update
loop alone), and the seconds of each round stage's own work (`<stage>: done in …`, model loading included).
Two torch threads (cpu_threads: 2, the default).  Writes cpu_dtype_stages.json and .md (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import (
    REPO,
    copy_repo,
    deep_update,
    dvc_executable,
    machine,
    run,
    stage_seconds,
    summary,
    write_params,
    write_report,
)

COMBINATIONS = [("float32", "avx2"), ("float32", "native"), ("bfloat16", "native"), ("bfloat16", "avx2")]
ROUND_STAGES = ("rollout@r1", "score@r1", "advantages@r1", "optimize@r1")
REDUCED = {
    "sft": {"epochs": 1, "num_builtin_demonstrations": 25, "batch_size": 8, "micro_batch_size": 8, "max_length": 32},
    "chat": {"template": "off"},
    "rollout": {"prompts_per_round": 4, "samples_per_prompt": 2, "max_new_tokens": 16, "batch_size": 8,
                "forward_batch_size": 8},
    "optim": {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 8},
    "rounds": {"r1": {"from": "sft"}},
}
REDUCED_NOTE = ("sft: 24 demonstrations (one held out) of up to 32 tokens, in 3 steps of 8; the round: 4 prompts × 2 "
                "responses of up to 16 new tokens, one PPO epoch")


def render(path: Path) -> str:
    from rlhf_core.tooling.docs import markdown_table

    report = json.loads(path.read_text())
    results = report["results"]
    base = results["float32/avx2"]

    def median(name: str, key: str) -> float:
        return results[name][key]["median"]

    rows = [[*name.split("/"), f"{median(name, 'sft_steps_per_s'):.3f}",
             f"{base['sft_steps_per_s']['median'] / median(name, 'sft_steps_per_s'):.2f}×",  # time per step
             *(f"{median(name, stage):.1f}" for stage in ("rollout@r1", "optimize@r1")), f"{median(name, 'round'):.1f}",
             f"{median(name, 'round') / base['round']['median']:.2f}×"] for name in results]
    return "\n".join([
        *markdown_table(["weights", "kernels (cpu_isa)", "sft steps/s", "sft step time vs float32/avx2", "rollout@r1 (s)",
                         "optimize@r1 (s)", "round (s)", "round time vs float32/avx2"], rows), "",
        f"SmolLM2-135M shape ({report['parameters'] / 1e6:.0f}M parameters, random weights, built locally), the default "
        f"params reduced ({report['reduced_note']}); 2 torch threads; stage times are their `done in` times, model "
        f"loading included; the round is the four round stages'; "
        f"median of {report['runs']} interleaved runs; {report['machine']}, CPU flags with bf16: "
        f"{', '.join(report['bf16_flags']) or 'none'}; `python benchmarks/cpu_dtype_stages.py`."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from common import checkpoint_parameters

    from rlhf_core.model.loading import cpu_flags
    from rlhf_core.runtime.stage_times import read_measures
    from rlhf_core.tooling.local_models import write_local_model

    raw: dict[str, list[dict]] = {f"{d}/{i}": [] for d, i in COMBINATIONS}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-dtype-") as tmp:
        model = write_local_model(Path(tmp) / "model", "smollm2-135m")
        base = Path(tmp) / "base"
        base.mkdir()
        copy_repo(base, deep_update({"sft": {"model": str(model)}}, REDUCED))
        run([dvc_executable(), "repro", "prepare"], base)
        run(["git", "add", "-A"], base)
        run(["git", "commit", "-qm", "prepared"], base)
        for repetition in range(args.runs):
            for dtype, isa in COMBINATIONS:
                out = Path(tmp) / f"{dtype}-{isa}-{repetition}"
                shutil.copytree(base, out, symlinks=True)
                write_params(out / "params.yaml", out / "params.yaml",
                             lambda raw_params: deep_update(raw_params, {"cpu_isa": isa,  # noqa: B023
                                                                         "compute": {"param_dtype": dtype}}))  # noqa: B023
                output, _ = run([dvc_executable(), "repro", "optimize@r1"], out)
                seconds = stage_seconds(output)
                result = {"sft_steps_per_s": read_measures(out)["sft"]["sft_steps_per_s"],
                          **{stage: seconds[stage] for stage in ROUND_STAGES},
                          "round": sum(seconds[stage] for stage in ROUND_STAGES)}
                raw[f"{dtype}/{isa}"].append(result)
                print(dtype, isa, result, flush=True)
                shutil.rmtree(out)
        parameters = checkpoint_parameters(model)
    report = {"machine": machine(), "runs": args.runs, "parameters": parameters,
              "bf16_flags": sorted({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags()), "reduced": REDUCED,
              "reduced_note": REDUCED_NOTE,
              "results": {name: {key: summary([v[key] for v in values], 6) for key in values[0]}
                          for name, values in raw.items()}}
    write_report(args.out, "cpu_dtype_stages", report, render)


if __name__ == "__main__":
    sys.exit(main())
