"""Start a stage the way params.yaml asks: warm, in process as plain python, or under ``accelerate launch``.

    python -m rlhf_core.runtime.launch stages.rollout --round r1 [--params params.yaml]

dvc.yaml runs every stage through this launcher, so ``compute.*`` in params.yaml decides how they run
and nobody edits dvc.yaml:

- ``compute.num_processes: 1`` with ``compute.warm_start`` on a CPU (Linux): a child of the warm-start
  server, which has already imported torch and transformers, runs the stage (rlhf_core/runtime/warm.py);
- ``compute.num_processes: 1`` otherwise, or when no server can be reached: the stage module runs in
  this very process (no extra interpreter);
- more, for a distributed stage (``DISTRIBUTED_STAGES``: rollout and optimize): this process becomes
  ``accelerate launch --config_file configs/accelerate/<strategy>.yaml --num_processes N
  --mixed_precision M --main_process_port P -m stages.rollout --round r1``.  Every other stage
  (prepare, sft, score, advantages, evaluate, track, train_reward) runs as one process whatever
  ``compute.num_processes`` says: N copies of it would only race on the same outputs.
- ``compute.launcher: ray``: rollout and optimize run on a Ray cluster as one gang of ``num_machines`` members
  (rlhf_core/runtime/ray_launch.py), each the same `accelerate launch` line with its own ``--machine_rank``
  (or, for one process in all, the stage itself); this process waits for them.

When params.yaml cannot be read or is invalid, the stage runs in process and reports the error in its
usual one line.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
from pathlib import Path

from rlhf_core.errors import RLHFError

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def accelerate_config(strategy: str) -> Path:
    """The accelerate config file shipped for a strategy: configs/accelerate/<strategy>.yaml."""
    return ACCELERATE_CONFIGS / f"{strategy}.yaml"


# cpu_isa: avx2 -> what each library reads to choose its CPU kernels (torch's ATen, oneDNN, MKL)
PINNED_CPU_ISA = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def cpu_has_avx2() -> bool:
    """Whether this is an x86 CPU with AVX2 (and FMA), the ISA ``cpu_isa: avx2`` pins the kernels to."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma"} <= set(flags.split(":", 1)[1].split())


def pin_cpu_numerics(cpu_isa: str, environ=None) -> dict[str, str]:
    """Set, in ``environ`` (default os.environ), the variables that pin the CPU kernels of the stage about to
    start (before torch is imported: the stage in process, a warm-start server, or accelerate's processes
    inherit them).  ``avx2`` on an AVX2-capable x86 CPU: ``PINNED_CPU_ISA``; otherwise nothing (an ARM CPU, or
    ``native``).  Returns what it set."""
    environ = os.environ if environ is None else environ
    if cpu_isa != "avx2" or not cpu_has_avx2():
        return {}
    environ.update(PINNED_CPU_ISA)
    return dict(PINNED_CPU_ISA)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for the rendezvous of one single-node launch."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def params_path(stage_args: list[str]) -> str:
    for index, arg in enumerate(stage_args):
        if arg == "--params" and index + 1 < len(stage_args):
            return stage_args[index + 1]
        if arg.startswith("--params="):
            return arg.split("=", 1)[1]
    return "params.yaml"


# The stages that join a process group (rlhf_core.runtime.distributed.start_runtime) and share their work across ranks.
DISTRIBUTED_STAGES = ("stages.rollout", "stages.optimize")


def processes_for(module: str, compute) -> int:
    """How many processes ``module`` runs as, over all machines: optimize num_processes × num_machines, rollout
    rollout_processes (default num_processes) × num_machines, any other stage 1."""
    if module == "stages.rollout":
        return compute.rollout_process_count * compute.num_machines
    return compute.num_processes * compute.num_machines if module in DISTRIBUTED_STAGES else 1


def build_command(module: str, stage_args: list[str], compute, *, port: int | None = None, machine_rank: int = 0,
                  main_process_ip: str = "") -> list[str] | None:
    """The `accelerate launch` command line of machine ``machine_rank`` for ``compute``; None when the stage runs in
    one process.  Over several machines (launcher: ray) every machine runs the same line with its own
    ``--machine_rank``, and ``main_process_ip``:``port`` is machine 0's rendezvous."""
    if processes_for(module, compute) == 1:
        return None
    machines: list[str] = []
    if compute.num_machines > 1:
        if not main_process_ip or not port:
            raise ValueError("build_command: several machines need machine 0's address and port")
        machines = ["--num_machines", str(compute.num_machines), "--machine_rank", str(machine_rank),
                    "--main_process_ip", main_process_ip]
    else:
        port = port or compute.main_process_port or int(os.environ.get("RLHF_MAIN_PROCESS_PORT") or 0) or free_port()
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(accelerate_config(compute.strategy)),
            "--num_processes", str(processes_for(module, compute)),
            "--mixed_precision", compute.mixed_precision,
            *machines,
            "--main_process_port", str(port),
            "-m", module, *stage_args]


def run_in_process(module: str, stage_args: list[str]) -> None:
    sys.argv = [module, *stage_args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


USAGE = "usage: python -m rlhf_core.runtime.launch <stage module, e.g. stages.rollout> [stage arguments]"
RETIRED_FLAGS = ("--follow", "--end")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in RETIRED_FLAGS:
        print(f"error: launch {argv[0]}: retired with the shared-filesystem follower; several machines run on a Ray "
              "cluster: set compute.launcher: ray (docs/scaling.md)", file=sys.stderr)
        sys.exit(2)
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    module, stage_args = argv[0], argv[1:]
    from rlhf_core.config import load_params

    try:
        params = load_params(params_path(stage_args))
    except RLHFError:  # the stage itself reports it, in its own words
        run_in_process(module, stage_args)
        return
    pin_cpu_numerics(params.cpu_isa)
    from rlhf_core.runtime.warm import QUIET_IMPORT_ENV

    for name, value in QUIET_IMPORT_ENV.items():  # warm or cold, every stage imports numpy and pyarrow alike
        os.environ.setdefault(name, value)
    compute = params.compute
    if compute.launcher == "ray" and module in DISTRIBUTED_STAGES:
        from rlhf_core.runtime.ray_launch import run_gang

        def command_of(machine_rank: int, main_process_ip: str, port: int) -> list[str]:
            return build_command(module, stage_args, compute, port=port, machine_rank=machine_rank,
                                 main_process_ip=main_process_ip) or [sys.executable, "-m", module, *stage_args]

        sys.exit(run_gang(module, params, processes_for(module, compute), command_of))
    command = build_command(module, stage_args, compute)
    if command is None:
        if compute.warm_start:
            from rlhf_core.runtime import warm

            if warm.supported(params.device, processes_for(module, compute)):
                code = warm.run_stage(module, stage_args)
                if code is not None:
                    sys.exit(code)
        run_in_process(module, stage_args)
        return
    print("launch: " + " ".join(command), file=sys.stderr, flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
