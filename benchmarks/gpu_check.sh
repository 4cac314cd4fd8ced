#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): the default pipeline on CUDA with bf16 weights, 2 rounds,
# then the same with gradient checkpointing; one line per check, exit code 0 when all passed.
# Run it from the repository root, in an environment where `pip install -e .` was done with a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python benchmarks/gpu_check.py --device "${DEVICE:-cuda}" "$@"
