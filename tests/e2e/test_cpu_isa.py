"""cpu_isa: avx2 makes an AVX-512 machine compute the floats an AVX2 machine computes.

The sft stage (a short from-scratch training) runs through the launcher three times on this machine:
- cpu_isa: avx2 (the default), nothing in the environment;
- cpu_isa: native, with the environment an AVX2-only x86 machine would give its libraries (torch's ATen, oneDNN
  and MKL capped at AVX2): the same bytes;
- cpu_isa: native on this machine as it is: different bytes where it has AVX-512 (so the pin is what makes
  the first two agree; skipped elsewhere).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_core.config import params_from_dict
from rlhf_core.config.rendering import render_params_yaml
from rlhf_core.runtime.launch import cpu_has_avx2

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

SMALL_SFT = {"device": "cpu", "compute": {"warm_start": False},
             "sft": {"num_builtin_demonstrations": 300, "epochs": 1, "batch_size": 32, "max_length": 48,
                     "tiny": {"vocab_size": 400, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                              "intermediate_size": 128}}}


def sft_digest(workdir: Path, cpu_isa: str, extra_env: dict[str, str]) -> str:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in SMALL_SFT.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) else values
    raw["cpu_isa"] = cpu_isa
    workdir.mkdir(parents=True)
    (workdir / "params.yaml").write_text(render_params_yaml(params_from_dict(raw)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")}
    env.update(PYTHONPATH=str(REPO), RLHF_PROGRESS="off", **extra_env)
    result = subprocess.run([sys.executable, "-m", "rlhf_core.runtime.launch", "stages.sft"], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return hashlib.sha256((workdir / "models/sft/model.safetensors").read_bytes()).hexdigest()


@pytest.mark.skipif(not cpu_has_avx2(), reason="cpu_isa: avx2 pins nothing on a CPU without AVX2")
def test_pinned_kernels_give_the_bytes_of_an_avx2_machine(tmp_path):
    pinned = sft_digest(tmp_path / "pinned", "avx2", {})
    # What an AVX2-only x86 CPU gives each library: torch's ATen and oneDNN, and MKL, which picks its own kernels by
    # CPU (on an Intel AVX-512 CPU its default kernels differ from its AVX2 ones; leaving MKL out of this stand-in
    # made the test fail on a Sapphire Rapids machine while the pin itself was right).
    avx2_machine = sft_digest(tmp_path / "avx2", "native", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                                            "MKL_ENABLE_INSTRUCTIONS": "AVX2"})
    assert pinned == avx2_machine
    flags = Path("/proc/cpuinfo").read_text()
    if "avx512f" in flags:
        assert sft_digest(tmp_path / "native", "native", {}) != pinned  # without the pin the bits follow the CPU
