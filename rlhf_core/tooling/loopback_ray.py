"""A 2-node Ray cluster on loopback, for the `-m ray` tests and benchmarks/ray_startup.py: a head on 127.0.0.2 and a second node on 127.0.0.3.

The recipe that keeps Ray on loopback (docs/scaling.md): each node its own 127.x address (with 127.0.0.1 Ray
rewrites the address to the machine's external one), usage stats off, gloo on `lo`, explicit memory so a raylet
does not claim the machine.  Each node is one `ray start --block` in its own session; stopping sends SIGTERM and
then SIGKILL to those sessions' process groups and to every descendant found under them, by id: never
`ray stop`, which kills by name across the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rlhf_core.runtime.launch import free_port

HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
LOOPBACK_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "GLOO_SOCKET_IFNAME": "lo", "RAY_DEDUP_LOGS": "0",
                "RAY_COLOR_PREFIX": "0"}


def descendants(pids: set[int]) -> set[int]:
    """Every live process below ``pids`` (by parent id, through /proc), and those in their process groups."""
    children: dict[int, list[int]] = {}
    groups: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        groups[int(entry.name)] = int(fields[2])
    found, stack = set(), list(pids)
    while stack:
        pid = stack.pop()
        for child in children.get(pid, []):
            if child not in found:
                found.add(child)
                stack.append(child)
    found |= {pid for pid, group in groups.items() if group in pids}
    return found | {pid for pid in pids if pid in groups}


class LoopbackCluster:
    def __init__(self, temp_dir: Path, head_cpus: int = 1, node_cpus: int = 1):
        self.port = free_port(HEAD_IP)
        self.address = f"{HEAD_IP}:{self.port}"
        self.env = {**os.environ, **LOOPBACK_ENV}
        ray = str(Path(sys.executable).with_name("ray"))
        memory = ["--memory", str(3 << 30), "--object-store-memory", str(200 << 20), "--disable-usage-stats"]
        self.starts = [subprocess.Popen(
            [ray, "start", "--block", "--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}",
             f"--num-cpus={head_cpus}", "--include-dashboard=false", f"--temp-dir={temp_dir}", *memory],
            env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        self._wait_nodes(1)
        self.starts.append(subprocess.Popen(
            [ray, "start", "--block", f"--address={self.address}", f"--node-ip-address={NODE_IP}",
             f"--num-cpus={node_cpus}", f"--temp-dir={temp_dir / 'node'}", *memory],
            env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait_nodes(2)

    def _wait_nodes(self, count: int, timeout: float = 90.0) -> None:
        probe = ("import ray, logging; ray.init(address=%r, logging_level=logging.ERROR); "
                 "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True,
                                    timeout=60)
            if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the loopback Ray cluster did not reach {count} node(s) in {timeout:.0f} s")

    def pids(self) -> set[int]:
        return descendants({start.pid for start in self.starts})

    def stop(self) -> None:
        pids = self.pids()
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
                for start in self.starts:
                    start.poll()  # reap our own children
                time.sleep(0.2)
            pids = {pid for pid in pids if Path(f"/proc/{pid}").exists()}
            if not pids:
                return
