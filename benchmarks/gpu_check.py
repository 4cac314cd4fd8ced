"""The GPU check: the default pipeline on CUDA with bf16 weights, 2 rounds, then again with gradient checkpointing.

    bash benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU and this package installed
    python benchmarks/gpu_check.py --device cpu  # the same checks on CPU (what the test suite runs, reduced)

For each variant it copies the repository (without results) into a temporary directory, sets
``device``, ``compute.param_dtype: bfloat16`` (and ``compute.gradient_checkpointing: true`` in the second
variant) and two rounds, runs ``dvc repro``, and checks:

- every recorded log-prob, reference log-prob and value in rollouts/r1 and rollouts/r2 is finite;
- optimize's first minibatch saw a ratio of 1 (``first_minibatch_ratio_max_deviation`` below 1e-2: bf16
  rounding only) and a finite loss in both rounds;
- the checkpoints are bfloat16 and the evaluation's reward and KL are finite.

It prints one line per check and a last line ``gpu check: N passed, M failed``; the exit code is 0 only
when every check passed.  Nothing but this package and its PyPI dependencies is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, copy_repo, deep_update, dvc_executable, write_params

REDUCED = {  # --reduced: the test suite's CPU run; the GPU check runs the default sizes
    "prepare": {"num_builtin_prompts": 300},
    "sft": {"tiny": {"vocab_size": 400, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
            "num_builtin_demonstrations": 600, "epochs": 1, "batch_size": 32, "max_length": 48},
    "rollout": {"prompts_per_round": 8, "samples_per_prompt": 2, "max_new_tokens": 12},
    "optim": {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 4},
    "evaluate": {"num_prompts": 8, "samples_per_prompt": 1, "max_new_tokens": 12, "num_perplexity_texts": 16},
}


class Checks:
    def __init__(self) -> None:
        self.passed = self.failed = 0

    def check(self, what: str, ok: bool, detail: str = "") -> None:
        self.passed += ok
        self.failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)


def finite_lists(values) -> bool:
    return all(math.isfinite(float(x)) for row in values for x in row)


def run_variant(checks: Checks, name: str, device: str, checkpointing: bool, reduced: bool) -> None:
    import pandas as pd
    from safetensors import safe_open

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        copy_repo(work)

        def edit(raw):
            if reduced:
                deep_update(raw, REDUCED)
            raw["device"] = device
            raw["compute"].update(param_dtype="bfloat16", gradient_checkpointing=checkpointing)
            raw["rounds"] = {"r1": {"from": "sft"}, "r2": {"from": "r1"}}

        write_params(work / "params.yaml", work / "params.yaml", edit)
        started = time.perf_counter()
        result = subprocess.run([dvc_executable(), "repro"], cwd=work, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        checks.check(f"{name}: dvc repro", result.returncode == 0,
                     f"{seconds:.0f} s" if result.returncode == 0 else (result.stdout + result.stderr)[-3000:])
        if result.returncode != 0:
            return
        for round_key in ("r1", "r2"):
            table = pd.read_parquet(work / f"rollouts/{round_key}/rollouts.parquet")
            checks.check(f"{name}: rollout@{round_key} log-probs, reference log-probs and values are finite",
                         all(finite_lists(table[column]) for column in ("logprobs", "ref_logprobs", "values")))
            metrics = json.loads((work / f"metrics/{round_key}/optimize.json").read_text())
            deviation = metrics["first_minibatch_ratio_max_deviation"]
            checks.check(f"{name}: optimize@{round_key} first-minibatch ratio is 1", deviation < 1e-2,
                         f"max |ratio - 1| = {deviation:.2e}")
            checks.check(f"{name}: optimize@{round_key} loss is finite", math.isfinite(metrics["policy_loss"]),
                         f"policy loss {metrics['policy_loss']:.4f}")
            with safe_open(str(work / f"models/{round_key}/model.safetensors"), "pt") as weights:
                dtypes = {str(weights.get_tensor(key).dtype) for key in weights.keys()}
            checks.check(f"{name}: models/{round_key} is bfloat16", dtypes == {"torch.bfloat16"}, str(sorted(dtypes)))
        evaluation = json.loads((work / "metrics/eval.json").read_text())
        checks.check(f"{name}: evaluation reward and KL are finite",
                     all(math.isfinite(evaluation[key][m]) for key in ("sft", "r1", "r2") for m in ("reward", "kl")),
                     f"r2 reward {evaluation['r2']['reward']:.3f}, kl {evaluation['r2']['kl']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    parser.add_argument("--reduced", action="store_true", help="smaller data and model (the test suite's CPU run)")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"gpu check: --device {args.device}: CUDA is not available (torch {torch.__version__})")
        print(f"gpu check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}",
              flush=True)
    checks = Checks()
    run_variant(checks, "bf16", args.device, checkpointing=False, reduced=args.reduced)
    run_variant(checks, "bf16 + gradient checkpointing", args.device, checkpointing=True, reduced=args.reduced)
    print(f"gpu check: {checks.passed} passed, {checks.failed} failed", flush=True)
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
