"""benchmarks/gpu_check.sh, the check to run on a GPU machine, run here on CPU with reduced sizes: the same
two `dvc repro` runs (bf16 weights, then with gradient checkpointing) and the same checks."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.e2e.test_pipeline import REPO

pytestmark = pytest.mark.e2e


def test_gpu_check_script_passes_on_cpu_with_reduced_sizes():
    env = {**os.environ, "DEVICE": "cpu", "RLHF_PROGRESS": "off"}
    result = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--reduced"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert result.stdout.splitlines()[-1] == "gpu check: 20 passed, 0 failed"
    assert "first-minibatch ratio is 1" in result.stdout and "is bfloat16" in result.stdout
