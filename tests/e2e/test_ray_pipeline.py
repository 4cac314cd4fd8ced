"""End to end on a 2-node Ray cluster on loopback (127.0.0.2, 127.0.0.3): compute.launcher: ray.

rollout and optimize run as a gang of 2 members of 1 gloo process each, one per node (ray_placement: spread),
through the real `dvc repro`; they must give the bytes that the local launcher's 2 processes give (the same
world size, ranks and reduction order).  A worker killed mid-optimize fails the stage in one line naming it and
its node, and a re-run recovers.  Run with `-m ray` in an environment with requirements-ray.lock installed:
they fail, never skip, without Ray.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from rlhf_core.tooling.loopback_ray import HEAD_IP, NODE_IP, LoopbackCluster
from tests.e2e.test_distributed_pipeline import TWO_PROCESSES  # the reduced 2-process pipeline
from tests.e2e.test_pipeline import _env, dvc, make_reduced_repo, ran_stages

pytestmark = pytest.mark.ray



@pytest.fixture(scope="module")
def cluster():
    import ray  # noqa: F401  (the tests need Ray: fail, not skip, without it)

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    started = LoopbackCluster(Path(temp_dir))
    try:
        yield started
    finally:
        started.stop()


def on_ray(workdir: Path, cluster: LoopbackCluster) -> None:
    """Switch a repository's params to the gang: 2 members × 1 process, one per node."""
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["compute"].update(launcher="ray", ray_address=cluster.address, ray_placement="spread", num_processes=1,
                          num_machines=2)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def digests(workdir: Path) -> dict[str, str]:
    files = [p for folder in ("rollouts/r1", "models/r1") for p in sorted((workdir / folder).rglob("*")) if p.is_file()]
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("compute", [{"strategy": "ddp"}, {"strategy": "fsdp"},
                                     {"strategy": "deepspeed", "zero_stage": 2}], ids=["ddp", "fsdp", "zero2"])
def test_a_ray_gang_on_two_nodes_gives_the_local_launchers_bytes(cluster, tmp_path, compute):
    workdir = make_reduced_repo(tmp_path / compute["strategy"], {**TWO_PROCESSES,
                                                                 "compute": {"num_processes": 2, **compute}})
    dvc(["repro", "optimize@r1"], workdir)
    local = digests(workdir)
    on_ray(workdir, cluster)
    output = dvc(["repro", "optimize@r1"], workdir)
    assert {"rollout@r1", "optimize@r1"} <= ran_stages(output) and "sft" not in ran_stages(output), output[-3000:]
    assert output.count(f"member 0 on {HEAD_IP}, member 1 on {NODE_IP}") == 2, output[-3000:]
    assert "--num_machines 2 --machine_rank 0" in output
    assert digests(workdir) == local


def _rank_processes(workdir: Path, module: str) -> dict[int, int]:
    """{global rank: pid} of the stage processes that accelerate started for ``module`` in ``workdir``."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            if module.encode() not in command or os.readlink(entry / "cwd") != str(workdir):
                continue
            environ = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
        except (OSError, ValueError):
            continue
        if b"RANK" in environ and b"LOCAL_RANK" in environ:
            found[int(environ[b"RANK"])] = int(entry.name)
    return found


def test_a_worker_killed_mid_optimize_fails_the_stage_in_one_line_and_a_rerun_recovers(cluster, tmp_path):
    workdir = make_reduced_repo(tmp_path / "kill", TWO_PROCESSES)
    on_ray(workdir, cluster)
    dvc(["repro", "optimize@r1"], workdir)
    trained = digests(workdir)
    for path in (workdir / "models/r1").iterdir():
        path.unlink()
    (workdir / "models/r1").rmdir()
    command = [sys.executable, "-m", "rlhf_core.runtime.launch", "stages.optimize", "--round", "r1"]
    stage = subprocess.Popen(command, cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while 1 not in _rank_processes(workdir, "stages.optimize") and time.monotonic() < deadline:
            assert stage.poll() is None, stage.communicate()
            time.sleep(0.2)
        time.sleep(2.0)  # past its start: in the middle of loading or training
        os.kill(_rank_processes(workdir, "stages.optimize")[1], signal.SIGKILL)
        _, stderr = stage.communicate(timeout=120)
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
    assert stage.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == [errors[-1]] and errors[0].startswith(f"error: optimize: member 1 on node {NODE_IP} "), stderr[-3000:]
    assert not (workdir / "models/r1").exists()  # no partial output
    time.sleep(1.0)
    assert not _rank_processes(workdir, "stages.optimize")  # every member's processes were stopped
    rerun = subprocess.run(command, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert digests(workdir) == trained


def test_a_gang_past_its_timeout_is_stopped_in_one_line(cluster, tmp_path):
    """compute.ray_timeout_s: a hung (here: not yet started) gang does not hang the pipeline."""
    workdir = make_reduced_repo(tmp_path / "timeout", TWO_PROCESSES)
    on_ray(workdir, cluster)
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["compute"]["ray_timeout_s"] = 2.0
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "rlhf_core.runtime.launch", "stages.optimize", "--round", "r1"],
                            cwd=workdir, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and time.monotonic() - started < 60, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: optimize: member 0 on node {HEAD_IP}, member 1 on node {NODE_IP} had not finished "
                      "after compute.ray_timeout_s = 2 s; every member was stopped (dvc repro runs the stage again)"]
    time.sleep(1.0)
    assert not _rank_processes(workdir, "stages.optimize")


def test_the_cluster_talks_on_loopback_only(cluster):
    """After the runs above: every connection of the cluster's processes is to 127.0.0.0/8 (IPv4, or IPv4-mapped)."""
    import ipaddress

    import psutil

    remote = set()
    for pid in cluster.pids():
        try:
            remote |= {c.raddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.raddr}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    addresses = [ipaddress.ip_address(ip) for ip in remote]
    assert addresses and all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in addresses), remote
