"""compute.launcher: ray -- a distributed stage (rollout, optimize) as one gang on a Ray cluster.

    dvc repro ── python -m rlhf_core.runtime.launch stages.optimize --round r1       (the machine running dvc repro)
                   └─ run_gang: ray.init(compute.ray_address or RAY_ADDRESS)
                        a placement group of num_machines bundles, {CPU (GPU on CUDA): num_processes} each, PACK or
                        SPREAD; bundle 0 on this node, so global rank 0 writes the outputs here
                        one ``Member`` actor per bundle runs machine k's line in the repository: the same
                        `accelerate launch … --machine_rank k` the local launcher runs (or, for one process in all,
                        ``python -m stages.optimize …``), with this process's numerics pins and settings
                        their output lines stream here (Ray's log_to_driver)
                        every member exits 0 → 0; the first failure (an exit code, a dead actor or node) or
                        compute.ray_timeout_s → every member is stopped, one line names the member and its node → 1

The storage contract: the repository, with its virtualenv, is at the same path on every node (a filesystem all
nodes mount), so every member reads the round's inputs there and runs the same interpreter.  A member whose node
lacks them fails in one line naming the node.  Only global rank 0 writes, atomically, on this machine.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from rlhf_core.errors import ConfigError

# What the stage's processes must see as this process sees it: the CPU numerics pins, thread counts and the
# libraries' settings (a node's Ray worker otherwise has the environment its raylet was started with).
FORWARDED_NAMES = ("PYTHONPATH", "PYTHONHASHSEED", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY",
                   "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "CUBLAS_WORKSPACE_CONFIG")
FORWARDED_PREFIXES = ("RLHF_", "GLOO_", "NCCL_", "HF_", "TRANSFORMERS_", "MLFLOW_", "TOKENIZERS_", "PYARROW_")
PLACEMENT_WAIT_S = 300.0  # the most a stage waits for the cluster to have room for its gang
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL, for a member's processes


def cluster_address(compute, environ=None) -> str:
    """compute.ray_address, else RAY_ADDRESS; a missing one is one line."""
    environ = os.environ if environ is None else environ
    address = compute.ray_address.strip() or environ.get("RAY_ADDRESS", "").strip()
    if not address:
        raise ConfigError("compute.launcher = 'ray': no cluster address; set compute.ray_address (host:port of the "
                          "head, as `ray start --head` printed it) or RAY_ADDRESS")
    return address


def forwarded_environment(environ=None) -> dict[str, str]:
    """The variables of this process that every member's stage processes get too."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in environ.items()
            if name in FORWARDED_NAMES or name.startswith(FORWARDED_PREFIXES)}


def bundles(compute, processes_per_member: int, use_gpu: bool, driver_ip: str) -> list[dict[str, float]]:
    """The placement group's bundles: one per member, bundle 0 pinned to the driver's node (Ray's ``node:<ip>``)."""
    one = {"CPU": float(processes_per_member)}
    if use_gpu:
        one["GPU"] = float(processes_per_member)
    return [{**one, f"node:{driver_ip}": 0.001} if index == 0 else dict(one) for index in range(compute.num_machines)]


def missing_on_node(cwd: str, python: str) -> str:
    """'' when this node has the repository and the interpreter at the driver's paths, else what it lacks."""
    for path, what in ((cwd, "the repository"), (python, "the interpreter")):
        if not Path(path).exists():
            return f"{what} {path} is not there"
    return ""


def _die_with_parent() -> None:
    """In a member's child: SIGTERM when the member's process dies (Linux), so a killed actor leaves no stage behind."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):  # a libc without prctl (not Linux): nothing to ask for
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _member_class():
    import ray

    @ray.remote(max_restarts=0, max_concurrency=2)
    class Member:
        """One machine of the gang: runs its command line as a child in its own session, and stops it on request."""

        def __init__(self):
            self.process = None

        def node(self) -> str:
            return ray.util.get_node_ip_address()

        def free_port(self) -> int:
            import socket

            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((ray.util.get_node_ip_address(), 0))
                return sock.getsockname()[1]

        def run(self, command: list[str], cwd: str, environment: dict[str, str]) -> tuple[int, str]:
            import subprocess

            missing = missing_on_node(cwd, command[0])
            if missing:
                return 2, missing + " on this node (every node must mount the repository and its virtualenv at the " \
                          "same path: docs/scaling.md)"
            self.process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **environment},
                                            start_new_session=True, preexec_fn=_die_with_parent)
            return self.process.wait(), ""

        def stop(self) -> None:
            import signal

            if self.process is None or self.process.poll() is not None:
                return
            for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    return
                try:
                    self.process.wait(timeout=wait)
                    return
                except Exception:  # subprocess.TimeoutExpired
                    continue

    return Member


def _connect(address: str):
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every member's progress lines, not "repeated 2x"
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("compute.launcher = 'ray': Ray is not installed in this environment; "
                          "pip install -r requirements-ray.lock (docs/scaling.md)") from None
    import logging

    try:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    except Exception as exc:  # ConnectionError, or whatever Ray raises for an address that does not answer
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"compute.ray_address = {address!r}: no Ray cluster answers there ({message})") from None
    return ray


def _place(ray, compute, processes_per_member: int, use_gpu: bool):
    """The placement group of the gang, ready; one line when the cluster has no room for it."""
    from ray.util.placement_group import placement_group, remove_placement_group

    driver_ip = ray.util.get_node_ip_address()
    group = placement_group(bundles(compute, processes_per_member, use_gpu, driver_ip),
                            strategy=compute.ray_placement.upper())
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_WAIT_S)
    if not ready:
        remove_placement_group(group)
        free = ray.available_resources()
        raise ConfigError(f"compute.launcher = 'ray': the cluster has no room for {compute.num_machines} member(s) of "
                          f"{processes_per_member} {'GPU' if use_gpu else 'CPU'}(s) each, member 0 on this node "
                          f"{driver_ip} (free now: CPU {free.get('CPU', 0):g}, GPU {free.get('GPU', 0):g}); lower "
                          "compute.num_machines or num_processes, or add nodes")
    return group


def _uses_gpu(ray, device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def _stop(ray, members) -> None:
    """Stop every member's processes (SIGTERM, then SIGKILL), then the actors.  Best effort: a member whose actor
    or node is already gone has nothing left to stop, and its call fails."""
    refs = []
    for member in members:
        with contextlib.suppress(Exception):
            refs.append(member.stop.remote())
    with contextlib.suppress(Exception):
        ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S + 5)
    for member in members:
        with contextlib.suppress(Exception):
            ray.kill(member)


def _wait(ray, runs: dict, timeout_s: float) -> str:
    """Wait for every member; '' when all exited 0, else the line saying which failed first and how."""
    pending, deadline = list(runs), time.monotonic() + timeout_s
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = ", ".join(f"member {runs[ref][0]} on node {runs[ref][1]}" for ref in pending)
            return f"{names} had not finished after compute.ray_timeout_s = {timeout_s:g} s"
        done, pending = ray.wait(pending, num_returns=1, timeout=min(remaining, 1.0))
        for ref in done:
            index, node = runs[ref]
            try:
                code, message = ray.get(ref)
            except Exception as exc:  # the actor, its process or its node died
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                return f"member {index} on node {node} died ({type(exc).__name__}: {first})"
            if message:
                return f"member {index} on node {node}: {message}"
            if code != 0:
                return f"member {index} on node {node} exited with code {code}"
    return ""


def run_gang(module: str, params, processes: int, command_of) -> int:
    """Run a distributed stage of ``processes`` processes in all as one gang of ``compute.num_machines`` members on
    the Ray cluster; the exit code.  ``command_of(machine_rank, main_process_ip, port)`` is a member's command line
    (the launcher's: ``launch.build_command``)."""
    compute, stage = params.compute, module.removeprefix("stages.")
    try:
        ray = _connect(cluster_address(compute))
    except ConfigError as exc:
        print(f"error: {stage}: {exc}", file=sys.stderr, flush=True)
        return 2
    members, group, failure = [], None, ""
    try:
        per_member = processes // compute.num_machines
        use_gpu = _uses_gpu(ray, params.device)
        group = _place(ray, compute, per_member, use_gpu)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        member_class = _member_class()
        members = [member_class.options(num_cpus=per_member, num_gpus=per_member if use_gpu else 0,
                                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                                            group, placement_group_bundle_index=index)).remote()
                   for index in range(compute.num_machines)]
        nodes = ray.get([member.node.remote() for member in members])
        port = compute.main_process_port or ray.get(members[0].free_port.remote())
        commands = [command_of(index, nodes[0], port) for index in range(compute.num_machines)]
        print(f"launch: ray: {module} as {compute.num_machines} member(s) × {per_member} process(es), "
              f"{compute.ray_placement}: " + ", ".join(f"member {i} on {node}" for i, node in enumerate(nodes)),
              file=sys.stderr, flush=True)
        print("launch: " + " ".join(commands[0]), file=sys.stderr, flush=True)
        environment = forwarded_environment()
        runs = {member.run.remote(command, os.getcwd(), environment): (index, nodes[index])
                for index, (member, command) in enumerate(zip(members, commands))}
        failure = _wait(ray, runs, compute.ray_timeout_s)
    except ConfigError as exc:
        print(f"error: {stage}: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if members:
            _stop(ray, members)
        if group is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):  # gone with the cluster
                remove_placement_group(group)
        ray.shutdown()
    if failure:
        print(f"error: {stage}: {failure}; every member was stopped (dvc repro runs the stage again)",
              file=sys.stderr, flush=True)
        return 1
    return 0
