"""Warm start (rlhf_core/runtime/warm.py): stages forked from a server that has already done the imports.

The server tests run real servers in a temporary repository holding a copy of rlhf_core and a probe
stage.  They preload only ``json`` (RLHF_WARM_PRELOAD) so that each server starts in well under a
second; one test preloads torch, as the default does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_core.runtime import warm

REPO = Path(__file__).resolve().parents[1]
PROBE = '''
import json, os, sys, time
print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv[1:], "cwd": os.getcwd(),
                  "probe": os.environ.get("PROBE"), "torch_loaded": "torch" in sys.modules,
                  "stdout_tty": sys.stdout.isatty()}), flush=True)
print("probe on stderr", file=sys.stderr)
if "--sleep" in sys.argv:
    open("started", "w").write(str(os.getpid()))
    time.sleep(60)
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
'''

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="warm start is Linux-only")


@pytest.fixture()
def probe_repo(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "rlhf_core", repo / "rlhf_core", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "stages").mkdir()
    (repo / "stages" / "__init__.py").write_text("")
    (repo / "stages" / "probe.py").write_text(PROBE)
    (repo / "params.yaml").write_text("device: cpu\n")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("RLHF_WARM_PRELOAD", "json")
    monkeypatch.setenv("RLHF_WARM_IDLE_SECONDS", "20")
    monkeypatch.delenv("RLHF_WARM_START", raising=False)
    yield repo
    shutil.rmtree(repo)  # the servers exit within a second once their repository is gone


def launch(repo, *args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "rlhf_core.runtime.launch", "stages.probe", *args], cwd=repo,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60, **kwargs)


def probe_output(result) -> dict:
    return json.loads(result.stdout.splitlines()[0])


def test_stage_runs_in_a_child_of_the_server_with_the_clients_args_env_streams_and_exit_code(probe_repo):
    first = launch(probe_repo, "--round", "r1", env={"PROBE": "one", "PROBE_EXIT": "3"})
    second = launch(probe_repo, "--round", "r2", env={"PROBE": "two"})
    assert first.returncode == 3 and second.returncode == 0
    one, two = probe_output(first), probe_output(second)
    assert one["argv"] == ["--round", "r1"] and two["argv"] == ["--round", "r2"]
    assert one["probe"] == "one" and two["probe"] == "two"
    assert one["cwd"] == two["cwd"] == str(probe_repo)
    assert "probe on stderr" in first.stderr and "probe on stderr" in second.stderr
    assert not one["stdout_tty"]  # the client's stdout (a pipe here), not the server's
    # Both stages were forked by the same server: the same parent, which is not the client.
    assert one["ppid"] == two["ppid"] and one["pid"] != two["pid"]


def test_without_warm_start_the_stage_runs_in_the_clients_own_process(probe_repo):
    result = launch(probe_repo, env={"RLHF_WARM_START": "0"})
    (probe_repo / "cold.yaml").write_text("device: cpu\ncompute: {warm_start: false}\n")
    off = launch(probe_repo, "--params", "cold.yaml")
    assert result.returncode == 0 and off.returncode == 0
    for output in (probe_output(result), probe_output(off)):
        assert output["ppid"] == os.getpid()  # the test started it: no server in between
    assert not list((probe_repo.parent / "runtime").glob("rlhf-warm-*/*.log"))  # no server was started


def test_a_changed_source_file_gets_a_new_server(probe_repo):
    before = probe_output(launch(probe_repo))
    (probe_repo / "rlhf_core" / "errors.py").write_text((probe_repo / "rlhf_core" / "errors.py").read_text() + "\n# edit\n")
    after = probe_output(launch(probe_repo))
    assert before["ppid"] != after["ppid"]


def test_server_key_follows_code_and_import_time_environment_but_not_dvc_variables(probe_repo, monkeypatch):
    key = warm.server_key(probe_repo)
    monkeypatch.setenv("DVC_STAGE", "rollout@r1")
    assert warm.server_key(probe_repo) == key
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert warm.server_key(probe_repo) != key
    monkeypatch.delenv("OMP_NUM_THREADS")
    for name, value in (("ATEN_CPU_CAPABILITY", "avx512"), ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")):  # cpu_isa's pins
        with monkeypatch.context() as scoped:
            scoped.setenv(name, value)
            assert warm.server_key(probe_repo) != key  # a server on other CPU kernels must not serve the stage
    assert warm.server_key(probe_repo) == key
    (probe_repo / "stages" / "probe.py").write_text(PROBE + "\n")
    assert warm.server_key(probe_repo) != key


def test_killing_the_client_kills_the_stage(probe_repo):
    client = subprocess.Popen([sys.executable, "-m", "rlhf_core.runtime.launch", "stages.probe", "--sleep"], cwd=probe_repo,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage_pid = wait_for_stage(probe_repo)
    assert stage_pid != client.pid
    client.send_signal(signal.SIGKILL)
    client.wait()
    assert wait_until_gone(stage_pid)


def test_sigterm_to_the_client_reaches_the_stage(probe_repo):
    client = subprocess.Popen([sys.executable, "-m", "rlhf_core.runtime.launch", "stages.probe", "--sleep"], cwd=probe_repo,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stage_pid = wait_for_stage(probe_repo)
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=20) == 128 + signal.SIGTERM  # 143, as a cold stage killed by SIGTERM (was 1)
    assert "ended without an exit status" not in client.stderr.read()
    assert wait_until_gone(stage_pid)


def test_when_no_server_can_start_the_stage_runs_cold(probe_repo, tmp_path):
    result = launch(probe_repo, env={"XDG_RUNTIME_DIR": str(tmp_path / "missing" / "dir")})
    assert result.returncode == 0
    assert probe_output(result)["ppid"] == os.getpid()


def test_default_preload_gives_the_stage_torch_already_imported(probe_repo):
    env = {name: value for name, value in os.environ.items() if name != "RLHF_WARM_PRELOAD"}
    env["RLHF_WARM_PRELOAD"] = "torch,rlhf_core.model.checkpoints"
    output = probe_output(subprocess.run([sys.executable, "-m", "rlhf_core.runtime.launch", "stages.probe"], cwd=probe_repo,
                                         env=env, capture_output=True, text=True, timeout=120))
    assert output["torch_loaded"]
    cold = probe_output(launch(probe_repo, env={"RLHF_WARM_START": "0"}))
    assert not cold["torch_loaded"]  # the client itself imports no torch before the stage


def test_supported_only_for_one_process_cpu_runs(monkeypatch):
    monkeypatch.delenv("RLHF_WARM_START", raising=False)
    assert warm.supported("cpu", 1)
    assert not warm.supported("cpu", 2)
    assert not warm.supported("cuda", 1) and not warm.supported("mps", 1)
    monkeypatch.setenv("RLHF_WARM_START", "0")
    assert not warm.supported("cpu", 1)


def wait_for_stage(repo: Path) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (repo / "started").is_file() and (repo / "started").read_text():
            return int((repo / "started").read_text())
        time.sleep(0.05)
    raise AssertionError("the stage did not start")


def wait_until_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as stat:  # a zombie awaiting its parent's wait counts as gone
            if stat.read().split(") ")[1].startswith("Z"):
                return True
        time.sleep(0.05)
    return False


def test_process_started_is_this_process_start_or_the_launchers():
    code = ("import time; from rlhf_core.runtime.stage_times import process_started; "
            "print(time.time() - process_started())")
    since_start = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=REPO).stdout)
    assert 0.0 < since_start < 10.0
    launched = time.time() - 42.0
    env = {**os.environ, "RLHF_STAGE_STARTED": repr(launched)}
    since_launch = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                        cwd=REPO, env=env).stdout)
    assert 42.0 <= since_launch < 52.0


def test_warm_stage_reports_its_start_up_from_the_clients_start(probe_repo):
    (probe_repo / "stages" / "ready_probe.py").write_text(
        "import time\nfrom rlhf_core.runtime.cli import ready, run_stage\n\n"
        "def main(params, args):\n    \"\"\"Probe.\"\"\"\n    ready()\n    time.sleep(0.3)\n    ready()\n\n"
        "if __name__ == '__main__':\n    run_stage(main, name='probe')\n")
    # exec keeps the process (and its start time) of the shell, which slept 0.5 s before python started
    result = subprocess.run(["sh", "-c", f"sleep 0.5; exec {sys.executable} -m rlhf_core.runtime.launch stages.ready_probe"],
                            cwd=probe_repo, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    match = re.search(r"^probe: done in [\d.]+s \(start-up ([\d.]+)s \+ work ([\d.]+)s\); peak RSS \d+ MB$", result.stderr, re.M)
    assert match, result.stderr
    startup, work = float(match.group(1)), float(match.group(2))
    assert 0.5 <= startup < 10.0  # counted from the client's start, not from the fork
    assert 0.3 <= work < 5.0  # from the first ready(): the second one does not move it


def test_a_stage_called_in_process_reports_no_start_up(capsys, tmp_path, monkeypatch):
    from rlhf_core.runtime.cli import ready, run_stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("device: cpu\n")

    def main(params, args):
        """Probe."""
        ready()

    run_stage(main, name="probe", argv=[])  # e.g. from a test: the process started long before the stage
    assert re.search(r"^probe: done in [\d.]+s$", capsys.readouterr().err, re.M)


@pytest.mark.parametrize("start_thread", [
    "import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n",
    # a thread that `threading` does not know of, as OpenMP, BLAS or a Rust pool would start
    "import _thread, time\n_thread.start_new_thread(time.sleep, (30,))\n",
], ids=["python-thread", "native-thread"])
def test_a_preload_that_starts_a_thread_makes_the_server_refuse_and_stages_run_cold(probe_repo, monkeypatch,
                                                                                   start_thread):
    (probe_repo / "stages" / "threader.py").write_text(start_thread)
    monkeypatch.setenv("RLHF_WARM_PRELOAD", "stages.threader")
    first, second = probe_output(launch(probe_repo)), probe_output(launch(probe_repo))
    assert first["ppid"] == second["ppid"] == os.getpid()  # both ran in their own process, cold
    runtime = probe_repo.parent / "runtime"
    assert len(list(runtime.glob("rlhf-warm-*/*.refused"))) == 1
    assert len(list(runtime.glob("rlhf-warm-*/*.log"))) == 1  # the second stage did not start another server


def test_numpy_and_pyarrow_preloaded_start_no_thread_so_the_server_forks(probe_repo, monkeypatch):
    """numpy's OpenBLAS and pyarrow's jemalloc start helper threads at import unless the server's
    QUIET_IMPORT_ENV tells them not to; the native-thread count would then refuse every fork."""
    for name in warm.QUIET_IMPORT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RLHF_WARM_PRELOAD", "numpy,pyarrow.parquet")
    output = probe_output(launch(probe_repo))
    assert output["ppid"] != os.getpid()  # forked by the server: warm
    assert not list((probe_repo.parent / "runtime").glob("rlhf-warm-*/*.refused"))
