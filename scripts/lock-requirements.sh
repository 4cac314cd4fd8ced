#!/usr/bin/env bash
# Regenerate requirements.lock: the exact version of every package the pipeline and its tests install, for
# Linux x86-64 and Python 3.11, resolved against the CPU build of torch (torch itself is installed first, by
# README command 1 or 2, and is left out). Needs `uv` (pip install uv).
#   bash scripts/lock-requirements.sh
# TORCH_CPU_WHEELS: where the CPU torch wheel is listed (default: PyTorch's CPU wheel page).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=$(grep -o 'torch==[0-9.]*' README.md | head -1)
uv pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --find-links "${TORCH_CPU_WHEELS:-https://download.pytorch.org/whl/cpu/torch/}" \
  --constraint <(echo "${torch_version}+cpu") --no-emit-package torch --no-header \
  --output-file requirements.lock
sed -i '1i # Exact versions for Linux x86-64, Python 3.11; torch is installed first (README). Regenerate: bash scripts/lock-requirements.sh' requirements.lock
