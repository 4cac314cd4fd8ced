"""Several machines: machine 0 announces each distributed stage; every other machine follows.

``dvc repro`` runs on machine 0 only.  When it reaches a distributed stage (rollout, optimize) with
``compute.num_machines > 1``, the launcher there (``rlhf_core.runtime.launch``) writes an announcement into
``<repository>/.rlhf/launch/`` -- the `accelerate launch` command line of machine 0 -- and runs it.  On
every other machine ``python -m rlhf_core.runtime.launch --follow`` polls that directory (the repository is on a
filesystem all machines mount at the same path) and runs each announced command with its own
``--machine_rank``; the processes of all machines meet at the rendezvous (main_process_ip:port), share the
stage's work, and global rank 0 (on machine 0) alone writes the outputs.

    machine 0:   dvc repro; python -m rlhf_core.runtime.launch --end
    machine k:   python -m rlhf_core.runtime.launch --follow            (rank k from --machine-rank, RLHF_MACHINE_RANK,
                                                                  SLURM_NODEID or NODE_RANK)

Files (all written atomically): ``<stamp>.json`` an announcement, ``<stamp>.done`` machine 0's exit code
for it, ``end`` the end of the run (``--end``).  A follower takes only announcements and an end newer than
its own start (minus ``GRACE_SECONDS``), so leftovers of an earlier run are ignored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rlhf_core.errors import ConfigError
from rlhf_core.io import atomic_file

LAUNCH_DIR = Path(".rlhf") / "launch"
GRACE_SECONDS = 60.0  # an announcement this much older than the follower's start still counts (clock skew, start order)
POLL_SECONDS = 0.5


def launch_dir(root: Path | None = None) -> Path:
    from rlhf_core.io import repo_root

    return (root or repo_root()) / LAUNCH_DIR


def machine_rank_from_environment() -> int | None:
    """This machine's rank: RLHF_MACHINE_RANK, else Slurm's SLURM_NODEID, else torchrun's NODE_RANK."""
    for name in ("RLHF_MACHINE_RANK", "SLURM_NODEID", "NODE_RANK"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit():
                raise ConfigError(f"{name} = {value!r}: must be a machine rank (0, 1, …)")
            return int(value)
    return None


def rendezvous(compute) -> tuple[str, int]:
    """(address, port) of machine 0 for a run over several machines: the params, else MASTER_ADDR/MASTER_PORT."""
    address = compute.main_process_ip or os.environ.get("MASTER_ADDR", "").strip()
    port = compute.main_process_port or int(os.environ.get("MASTER_PORT", "0").strip() or 0)
    if not address or not port:
        raise ConfigError(f"compute.num_machines = {compute.num_machines}: the rendezvous needs machine 0's address "
                          "and a port: set compute.main_process_ip and compute.main_process_port, or MASTER_ADDR and "
                          "MASTER_PORT in the environment")
    return address, port


def with_machine_rank(command: list[str], rank: int) -> list[str]:
    """``command`` (an `accelerate launch` command line) with its ``--machine_rank`` value replaced by ``rank``."""
    index = command.index("--machine_rank")
    return [*command[:index + 1], str(rank), *command[index + 2:]]


def announce_and_run(command: list[str], cwd: Path, root: Path | None = None) -> int:
    """Machine 0: announce ``command`` to the followers, run it here, record its exit code; return that code."""
    directory = launch_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.time_ns()}-{os.getpid()}"
    with atomic_file(directory / f"{stamp}.json") as tmp:
        tmp.write_text(json.dumps({"command": command, "cwd": str(cwd), "created": time.time()}))
    print(f"launch: announced to the other machines as {directory / stamp}.json", file=sys.stderr, flush=True)
    code = subprocess.call(command, cwd=cwd)
    with atomic_file(directory / f"{stamp}.done") as tmp:
        tmp.write_text(f"{code}\n")
    return code


def end_run(root: Path | None = None) -> None:
    """Machine 0, after `dvc repro`: tell the followers that the run is over."""
    directory = launch_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / "end") as tmp:
        tmp.write_text(f"{time.time()}\n")


def follow(rank: int, *, root: Path | None = None, idle_timeout: float = 3600.0, log=print) -> int:
    """Machine ``rank`` (>= 1): run every stage machine 0 announces, as this machine's share, until machine 0
    ends the run (or nothing happens for ``idle_timeout`` seconds).  Returns 0, or 1 if a stage failed here."""
    if rank < 1:
        raise ConfigError(f"--follow: machine rank {rank}: followers are machines 1, 2, …; machine 0 runs dvc repro")
    directory = launch_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.time()
    since = started - GRACE_SECONDS
    handled: set[str] = set()
    failed = 0
    last_activity = time.monotonic()
    log(f"follow: machine {rank}, waiting for stages announced in {directory}")
    while True:
        for announcement in sorted(directory.glob("*.json")):
            if announcement.name in handled:
                continue
            handled.add(announcement.name)
            spec = json.loads(announcement.read_text())
            if spec["created"] < since or announcement.with_suffix(".done").exists():
                continue  # an earlier run's, or already over
            command = with_machine_rank(spec["command"], rank)
            module = command[command.index("-m", 3) + 1:]
            log(f"follow: machine {rank} runs {' '.join(module)}")
            code = subprocess.call(command, cwd=spec["cwd"])
            log(f"follow: {' '.join(module)} exited with {code}")
            failed += code != 0
            last_activity = time.monotonic()
        end = directory / "end"
        if end.exists() and end.stat().st_mtime >= since:
            log(f"follow: machine {rank}: the run ended")
            return 1 if failed else 0
        if time.monotonic() - last_activity > idle_timeout:
            log(f"follow: machine {rank}: nothing announced for {idle_timeout:.0f} s; stopping")
            return 1 if failed else 0
        time.sleep(POLL_SECONDS)
