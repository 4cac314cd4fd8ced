#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): the default pipeline on CUDA with bf16 weights, 2 rounds,
# then the same with gradient checkpointing; one line per check, exit code 0 when all passed.
# Where vLLM is installed it then runs the vLLM check on the same device (benchmarks/vllm_check.sh).
# Run it from the repository root, in an environment where `pip install -e .` was done with a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
timeout 480 python benchmarks/gpu_check.py --device "${DEVICE:-cuda}" "$@" || status=$?
if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"; then
  bash benchmarks/vllm_check.sh --device "${DEVICE:-cuda}" --dtype bfloat16 || status=$?
else
  echo "vllm check: not run (vLLM is not installed in this environment; README, vLLM)" >&2
fi
exit "$status"
