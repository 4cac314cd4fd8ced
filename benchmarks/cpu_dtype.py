"""float32 against bfloat16 weights on a CPU, with the kernels pinned to AVX2 (cpu_isa: avx2, the default) or not
(cpu_isa: native): what compute.param_dtype costs there, and why ``auto`` means float32 on most CPUs.

    python benchmarks/cpu_dtype.py [--runs 3] [--steps 1] [--out benchmarks/results]

Each measurement runs in a fresh process whose environment is the stage launcher's for that cpu_isa
(rlhf_core.runtime.launch.pin_cpu_numerics), one torch thread, interleaved over the 4 combinations:

matmul   a 256×512 @ 512×512 matmul (median of 50)
forward  a forward pass of a SmolLM2-135M-shape model (49,152 vocabulary, 30 blocks, hidden 576; built locally,
         random weights) on 2 sequences of 32 tokens: what recording a rollout's log-probs does per batch
step     a training step of that model on the same batch: forward, backward, AdamW (what sft and optimize repeat)

Writes cpu_dtype.json and cpu_dtype.md (the table of docs/performance.md#bfloat16-on-a-cpu).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, summary, write_report  # noqa: E402

COMBINATIONS = [("float32", "avx2"), ("float32", "native"), ("bfloat16", "native"), ("bfloat16", "avx2")]
WORKER = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
dtype, model_dir, steps = getattr(torch, sys.argv[1]), sys.argv[2], int(sys.argv[3])
a, b = torch.randn(256, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
times = []
for _ in range(55):
    started = time.perf_counter(); a @ b; times.append(time.perf_counter() - started)
result = {"matmul_ms": 1000 * statistics.median(times[5:])}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
ids = torch.randint(0, 40000, (2, 32))
with torch.no_grad():
    model(input_ids=ids)  # warm-up
    started = time.perf_counter(); model(input_ids=ids); result["forward_s"] = time.perf_counter() - started
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
step_times = []
for _ in range(steps + 1):
    started = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    step_times.append(time.perf_counter() - started)
result["step_s"] = statistics.median(step_times[1:])  # the first pays AdamW's state allocation
print(json.dumps(result))
"""


def render(path: Path) -> str:
    report = json.loads(path.read_text())
    lines = ["| weights | kernels (cpu_isa) | 256×512 @ 512×512 matmul (ms) | forward, 2 × 32 tokens (s) | "
             "training step (s) | step vs float32/avx2 |", "|---|---|---|---|---|---|"]
    base = report["results"]["float32/avx2"]["step_s"]["median"]
    for name, values in report["results"].items():
        dtype, isa = name.split("/")
        lines.append(f"| {dtype} | {isa} | {values['matmul_ms']['median']:.2f} | {values['forward_s']['median']:.2f} | "
                     f"{values['step_s']['median']:.2f} | {values['step_s']['median'] / base:.1f}× |")
    lines += ["", f"SmolLM2-135M shape (random weights, built locally), one torch thread; median (of "
              f"{report['runs']} interleaved runs) of each; {report['machine']}, CPU flags with bf16: "
              f"{', '.join(report['bf16_flags']) or 'none'}; `python benchmarks/cpu_dtype.py`."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    import os

    from rlhf_core.model.loading import cpu_flags
    from rlhf_core.runtime.launch import pin_cpu_numerics
    from rlhf_core.tooling.local_models import write_local_model

    model_dir = write_local_model(Path(tempfile.mkdtemp(prefix="cpu_dtype_")) / "model", "smollm2-135m")
    raw: dict[str, list[dict]] = {f"{d}/{i}": [] for d, i in COMBINATIONS}
    for _ in range(args.runs):
        for dtype, isa in COMBINATIONS:
            env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                                     "MKL_CBWR")}
            pin_cpu_numerics(isa, env)
            output = subprocess.run([sys.executable, "-c", WORKER, dtype, str(model_dir), str(args.steps)], env=env,
                                    capture_output=True, text=True, check=True).stdout
            raw[f"{dtype}/{isa}"].append(json.loads(output.strip().splitlines()[-1]))
            print(dtype, isa, raw[f"{dtype}/{isa}"][-1], flush=True)
    report = {"machine": machine(), "runs": args.runs,
              "bf16_flags": sorted({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags()),
              "results": {name: {key: summary([r[key] for r in runs], 4) for key in runs[0]}
                          for name, runs in raw.items()}}
    write_report(args.out, "cpu_dtype", report, render)


if __name__ == "__main__":
    main()
