"""Warm start: stages forked from a server that has already imported torch and transformers.

Every DVC stage is a fresh process, and on a small CPU machine importing torch plus a transformers
model class costs ~7 s: more than the real work of a stage on the tiny default model.  With
``compute.warm_start`` on (the default), ``python -m rlhf_core.runtime.launch stages.X`` does not import them
itself.  It asks a local server, which imported them once, to fork a child; the child takes over the
stage's working directory, environment, arguments and stdin/stdout/stderr (passed as file descriptors
over a Unix socket), runs the stage module as ``__main__`` and reports its exit code.  For DVC nothing
changes: the stage command is one process that prints the stage's output and exits with its status.
This is the daemon pattern of build tools (Gradle's daemon, Bazel's server) on a fork server.

Safety rules, each one tested:

- **No stale code.** A server is keyed by the Python executable, the repository directory, the source
  of ``rlhf_core/`` and ``stages/``, the modification times of the import path (a ``pip install``
  changes them) and the import-time environment variables (``TORCH*``, ``HF_*``, ``OMP_*``, …).  Any
  change gives a new key and a new server; the old one exits after ``IDLE_SECONDS`` without requests,
  or as soon as its repository directory is gone.
- **Fork safety.** The server only imports: it runs no torch op, starts no thread and never touches
  CUDA.  Before it forks anything it counts its threads, native ones included (``/proc/self/task``:
  OpenMP, BLAS, allocator and Rust pools are invisible to ``threading``); with more than its own, it
  refuses and every stage of that key runs cold.  It starts with ``QUIET_IMPORT_ENV`` (unless the user set
  those variables), so numpy's OpenBLAS and pyarrow's jemalloc start no helper thread at import.  Warm start is used on Linux, for one-process stages on CPU only (``device: cpu``, or ``auto`` on
  a machine without an NVIDIA device); GPU and multi-process runs start cold, as before.
- **Signals and kills.** The client forwards SIGINT, SIGTERM and SIGHUP to the child.  If the client
  dies (even by SIGKILL), the child sees its socket close and kills itself at once, so no orphaned
  stage goes on writing; outputs are atomic, so a killed stage leaves nothing partial.
- **Fallback.** When no server can be reached or started, or it goes away before forking, the stage
  runs in the client's own process (a cold start), exactly as with ``warm_start: false``.
  ``RLHF_WARM_START=0`` in the environment does the same for one command.

``RLHF_WARM_PRELOAD`` (comma-separated module names) replaces the modules a new server imports, e.g. to
add the modeling module of your own architecture; ``RLHF_WARM_IDLE_SECONDS`` sets its idle timeout.
The servers' logs are in ``$XDG_RUNTIME_DIR/rlhf-warm-<uid>/`` (or the temp directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

IDLE_SECONDS = 120.0  # a server exits after this long without a request
BOOT_TIMEOUT_SECONDS = 30.0  # how long a client waits for a server it started to listen
MAX_MESSAGE = 1 << 20
# Libraries every torch stage needs, the default model classes, and the library modules the stages
# import; optional ones (mlflow for track, vaderSentiment for the sentiment task) when installed.
PRELOAD = (
    "numpy", "pandas", "pyarrow.parquet", "yaml", "torch", "safetensors.torch", "tokenizers", "transformers",
    "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
    "transformers.generation.utils", "rlhf_core.config", "rlhf_core.io", "rlhf_core.model.checkpoints",
    "rlhf_core.phases.rollout", "rlhf_core.phases.sft", "rlhf_core.rl.advantages", "rlhf_core.phases.rewards",
    "rlhf_core.phases.evaluation", "rlhf_core.rl.algorithms.train", "rlhf_core.rl.algorithms.ppo",
    "rlhf_core.rl.algorithms.reinforce", "rlhf_core.rl.algorithms.trpo", "rlhf_core.phases.tasks.sentiment",
    "rlhf_core.phases.tasks.arithmetic", "rlhf_core.tooling.tracking", "vaderSentiment.vaderSentiment", "mlflow",
    "matplotlib.pyplot",
)
# Environment variables that libraries read when they are imported: a server imported with other values
# must not serve the stage.
IMPORT_TIME_ENV_PREFIXES = ("PYTHON", "TORCH", "PYTORCH", "CUDA", "NVIDIA", "OMP_", "MKL_", "KMP_", "OPENBLAS",
                            "ATEN_", "ONEDNN_", "DNNL_",  # the CPU kernels (cpu_isa): a server must compute the same floats
                            "HF_", "TRANSFORMERS", "TOKENIZERS", "MLFLOW", "LD_", "RLHF_WARM",
                            "JE_")  # JE_ARROW_MALLOC_CONF: pyarrow's allocator
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# ---------------------------------------------------------------------------------------------------
# When to use it, and which server


def supported(device: str, num_processes: int) -> bool:
    """Warm start applies to one-process CPU stages on Linux (forking after CUDA is initialised is unsafe)."""
    if os.environ.get("RLHF_WARM_START", "1") in ("0", "false", "no") or not sys.platform.startswith("linux"):
        return False
    if num_processes != 1:
        return False
    if device == "cpu":
        return True
    return device == "auto" and not any(Path("/dev").glob("nvidia[0-9]*"))


def server_key(repo: Path) -> str:
    """What a server must share with a stage to serve it (see the module docstring)."""
    digest = hashlib.sha256()
    for part in (sys.executable, sys.version, str(repo.resolve())):
        digest.update(part.encode() + b"\0")
    for package in ("rlhf_core", "stages"):
        for path in sorted((repo / package).rglob("*.py")):
            digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    root = repo.resolve()
    for entry in sys.path:  # installed packages: a `pip install` changes their directory's mtime
        with contextlib.suppress(OSError):
            path = Path(entry or ".").resolve()
            if path != root and root not in path.parents:  # not the repo itself: the stages write into it
                digest.update(f"{entry}:{path.stat().st_mtime_ns}\0".encode())
    for name in sorted(os.environ):
        if name.startswith(IMPORT_TIME_ENV_PREFIXES):
            digest.update(f"{name}={os.environ[name]}\0".encode())
    return digest.hexdigest()[:24]


def runtime_dir() -> Path:
    """A private directory for the sockets, locks and logs of this user's servers."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    directory = base / f"rlhf-warm-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def server_paths(key: str) -> dict[str, str | Path]:
    """The server's socket address (Linux's abstract namespace: no path-length limit, nothing to clean up;
    both ends check that the other runs as the same user) and its lock and log files."""
    directory = runtime_dir()
    return {"sock": f"\0rlhf-warm-{os.getuid()}-{key}", "lock": directory / f"{key}.lock",
            "log": directory / f"{key}.log", "refused": directory / f"{key}.refused"}


def same_user(connection: socket.socket) -> bool:
    """Whether the process at the other end of a Unix socket runs as this user (SO_PEERCRED)."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", credentials)
    return uid == os.getuid()


# ---------------------------------------------------------------------------------------------------
# Client: the stage command DVC runs


def run_stage(module: str, stage_args: list[str], repo: Path | None = None) -> int | None:
    """Run ``module`` with ``stage_args`` in a child forked by this repository's warm server.

    Returns the stage's exit code, or None when no server could take it (nothing of the stage ran;
    the caller runs it in process)."""
    repo = (repo or Path.cwd()).resolve()
    try:
        paths = server_paths(server_key(repo))
        connection = connect_or_start(paths, repo)
    except OSError:
        return None
    if connection is None:
        return None
    with connection:
        from rlhf_core.runtime.stage_times import STARTED_ENV, process_started

        env = dict(os.environ)
        started = process_started()
        if started is not None and STARTED_ENV not in env:  # the stage's start-up counts from this process's start
            env[STARTED_ENV] = repr(started)
        request = {"module": module, "args": stage_args, "cwd": os.getcwd(), "env": env}
        fds = [fd if _is_open(fd) else os.open(os.devnull, os.O_RDWR) for fd in (0, 1, 2)]
        try:
            socket.send_fds(connection, [json.dumps(request).encode()], fds)
            forked = _receive(connection)
        except OSError:
            return None
        if forked is None or "pid" not in forked:
            return None  # the server went away before forking: nothing ran
        child = int(forked["pid"])
        forwarded: list[int] = []

        def forward(received: int, frame) -> None:
            forwarded.append(received)
            _forward(child, received)

        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, forward)
        try:
            finished = _receive(connection)
        except OSError:
            finished = None
        if finished is None or "exit" not in finished:
            if forwarded:  # the stage died of the signal this client passed on: exit as a killed process would
                return 128 + forwarded[-1]
            print(f"error: {module}: the stage process {child} ended without an exit status (killed?)",
                  file=sys.stderr)
            return 1
        return int(finished["exit"])


def connect_or_start(paths: dict[str, Path], repo: Path) -> socket.socket | None:
    """A connection to the server at ``paths['sock']``, starting one when none is running."""
    connection = _connect(paths["sock"])
    if connection is not None:
        return connection
    if paths["refused"].exists():  # a server for this key found it could not fork safely: do not retry
        return None
    server = None
    with open(paths["lock"], "a") as lock:
        try:  # the lock is held by a live server for its whole life
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
            alive = False
        except BlockingIOError:
            alive = True
    if not alive:
        env = {name: value for name, value in os.environ.items() if not name.startswith("DVC_")}
        with open(paths["log"], "ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "rlhf_core.runtime.warm", paths["sock"][1:], str(paths["lock"]), str(repo),
                 str(paths["refused"])],
                cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + BOOT_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        connection = _connect(paths["sock"])
        if connection is not None:
            return connection
        if server is not None and server.poll() is not None:
            return None  # it could not start (see the log); run cold
        time.sleep(0.02)
    return None


def _connect(address: str) -> socket.socket | None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with contextlib.suppress(OSError):  # no server listening (yet)
        connection.connect(address)
        if same_user(connection):
            return connection
    connection.close()
    return None


def _receive(connection: socket.socket) -> dict | None:
    message = connection.recv(MAX_MESSAGE)
    return json.loads(message) if message else None


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _forward(child: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signum)


# ---------------------------------------------------------------------------------------------------
# Helper threads that libraries start at import unless told not to; a server that forks must have none.
QUIET_IMPORT_ENV = {
    "OPENBLAS_NUM_THREADS": "1",  # numpy's bundled OpenBLAS starts (cores - 1) workers at import
    "JE_ARROW_MALLOC_CONF": "background_thread:false",  # pyarrow's jemalloc starts a purging thread
}
# Server


def native_threads() -> list[str]:
    """The names of this process's threads, native ones included (Linux: ``/proc/self/task``)."""
    names = []
    for task in sorted(os.listdir("/proc/self/task")):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
    return names


def preload(log) -> None:
    """Import what the stages need; an optional library that is missing is skipped."""
    started = time.perf_counter()
    names = os.environ.get("RLHF_WARM_PRELOAD")
    for name in PRELOAD if names is None else [n.strip() for n in names.split(",") if n.strip()]:
        try:
            __import__(name)
        except ImportError as exc:
            log(f"preload: {name} skipped ({exc})")
    with contextlib.suppress(OSError, ValueError, AttributeError):  # the SFT model's own architecture
        model_type = json.loads(Path("models/sft/config.json").read_text())["model_type"].replace("-", "_")
        with contextlib.suppress(ImportError):
            __import__(f"transformers.models.{model_type}.modeling_{model_type}")
    log(f"preload: {len(sys.modules)} modules in {time.perf_counter() - started:.1f}s")


def serve(address: str, lock_path: Path, repo: Path, idle_seconds: float = IDLE_SECONDS,
          refused_path: Path | None = None) -> None:
    """Listen on the abstract socket ``address`` and fork one child per stage request, until idle or ``repo`` is gone."""
    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} [{os.getpid()}] {message}", flush=True)

    lock = open(lock_path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log("another server holds the lock; exiting")
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(64)  # clients wait in the backlog while the imports run
    log(f"serving {repo}")
    for name, value in QUIET_IMPORT_ENV.items():
        os.environ.setdefault(name, value)
    preload(log)
    threads = native_threads()
    if len(threads) > 1:  # forking a process with threads is unsafe: refuse, clients run cold
        log(f"preload started {len(threads) - 1} thread(s) besides the main one ({threads}; Python threads: "
            f"{[t.name for t in threading.enumerate()]}); refusing to fork, exiting")
        if refused_path is not None:  # clients of this key now run cold without trying again
            refused_path.write_text(f"a preloaded module started {len(threads) - 1} thread(s); forking is unsafe\n")
        return
    listener.settimeout(1.0)
    last_request = time.monotonic()
    while time.monotonic() - last_request < idle_seconds and repo.is_dir():
        _reap_children()
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        last_request = time.monotonic()
        if not same_user(connection):
            connection.close()
            continue
        try:
            message, fds, _, _ = socket.recv_fds(connection, MAX_MESSAGE, 3)
            request = json.loads(message)
        except (OSError, ValueError) as exc:
            log(f"bad request: {exc}")
            connection.close()
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            lock.close()
            _run_child(connection, fds, request)  # never returns
        log(f"forked {pid}: {request['module']} {' '.join(request['args'])} in {request['cwd']}")
        connection.close()
        for fd in fds:
            os.close(fd)
    log("idle; exiting")
    listener.close()


def _reap_children() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _run_child(connection: socket.socket, fds: list[int], request: dict) -> None:
    """In the forked child: become the stage process, run the stage, report its exit code, exit."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _reopen_standard_streams()
        connection.send(json.dumps({"pid": os.getpid()}).encode())
        threading.Thread(target=_die_with_client, args=(connection,), daemon=True).start()
        code = _run_module(request["module"], request["args"])
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            connection.send(json.dumps({"exit": code}).encode())
        os._exit(code)


def _run_module(module: str, args: list[str]) -> int:
    import atexit
    import runpy
    import traceback

    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001  (as the interpreter would: traceback, exit 1)
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    return code


def _reopen_standard_streams() -> None:
    """sys.std* over the client's descriptors, buffered as a fresh interpreter would buffer them."""
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=sys.stdin.encoding)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=sys.stdout.encoding,
                                  errors=sys.stdout.errors, line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=sys.stderr.encoding,
                                  errors="backslashreplace", line_buffering=True, write_through=unbuffered)


def _die_with_client(connection: socket.socket) -> None:
    """The client sends nothing more: EOF means it is gone, and the stage must not outlive it."""
    with contextlib.suppress(OSError):
        connection.recv(1)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    serve("\0" + sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]),
          float(os.environ.get("RLHF_WARM_IDLE_SECONDS") or IDLE_SECONDS), Path(sys.argv[4]))
