"""compute.launcher: ray without a cluster: the params, the one-line errors, the gang's placement and environment.

The gang itself runs on a 2-node loopback cluster in tests/e2e/test_ray_pipeline.py (`-m ray`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_core.config import ComputeParams, params_from_dict
from rlhf_core.errors import ConfigError
from rlhf_core.runtime import ray_launch

REPO = Path(__file__).resolve().parents[1]


def test_several_machines_need_the_ray_launcher():
    with pytest.raises(ConfigError, match=r"^compute.num_machines = 2: several machines run on a Ray cluster; set "
                                          r"compute.launcher: ray"):
        params_from_dict({"compute": {"num_machines": 2}})
    assert params_from_dict({"compute": {"num_machines": 2, "launcher": "ray"}}).compute.num_machines == 2


def test_the_follower_is_retired_in_one_line():
    with pytest.raises(ConfigError, match=r"^compute.main_process_ip: retired: the shared-filesystem follower is "
                                          r"gone: .*compute.launcher: ray"):
        params_from_dict({"compute": {"main_process_ip": "10.0.0.1"}})
    assert not (REPO / "rlhf_core/runtime/follow.py").exists()
    for flag in ("--follow", "--end"):
        result = subprocess.run([sys.executable, "-m", "rlhf_core.runtime.launch", flag], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.splitlines() == [f"error: launch {flag}: retired with the shared-filesystem follower; "
                                              "several machines run on a Ray cluster: set compute.launcher: ray "
                                              "(docs/scaling.md)"]


def test_vllm_serves_the_machine_running_dvc_repro_only():
    with pytest.raises(ConfigError, match=r"^rollout.engine = 'vllm': its warm engine serves the machine running dvc "
                                          r"repro; set compute.launcher: local \(got 'ray'\)"):
        params_from_dict({"rollout": {"engine": "vllm"}, "compute": {"launcher": "ray"}})


def test_a_missing_cluster_address_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"^compute.launcher = 'ray': no cluster address; set compute.ray_address"):
        ray_launch.cluster_address(ComputeParams(launcher="ray"))
    assert ray_launch.cluster_address(ComputeParams(launcher="ray"), {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    assert ray_launch.cluster_address(ComputeParams(launcher="ray", ray_address="h:1"), {"RAY_ADDRESS": "x:2"}) == "h:1"
    params = params_from_dict({"compute": {"launcher": "ray", "num_machines": 2}})
    assert ray_launch.run_gang("stages.optimize", params, 2, lambda *_: ["true"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: optimize: compute.launcher = 'ray': no cluster address; set compute.ray_address (host:port of the "
        "head, as `ray start --head` printed it) or RAY_ADDRESS"]


def test_member_zero_is_placed_on_the_machine_running_dvc_repro():
    compute = ComputeParams(launcher="ray", num_machines=3, num_processes=2)
    assert ray_launch.bundles(compute, 2, use_gpu=False, driver_ip="10.0.0.5") == [
        {"CPU": 2.0, "node:10.0.0.5": 0.001}, {"CPU": 2.0}, {"CPU": 2.0}]
    assert ray_launch.bundles(compute, 2, use_gpu=True, driver_ip="10.0.0.5")[1] == {"CPU": 2.0, "GPU": 2.0}


def test_the_members_get_the_numerics_pins_and_settings_of_the_driver():
    environ = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2", "RLHF_PROGRESS": "off",
               "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0", "HOME": "/root",
               "PATH": "/usr/bin"}
    assert ray_launch.forwarded_environment(environ) == {
        "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2", "RLHF_PROGRESS": "off",
        "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}  # never the GPUs: Ray assigns each member its own


def test_a_node_without_the_repository_says_which_path(tmp_path):
    assert ray_launch.missing_on_node(str(tmp_path), sys.executable) == ""
    assert ray_launch.missing_on_node(str(tmp_path / "repo"), sys.executable) == \
        f"the repository {tmp_path / 'repo'} is not there"
    assert ray_launch.missing_on_node(str(tmp_path), str(tmp_path / "python")) == \
        f"the interpreter {tmp_path / 'python'} is not there"
