"""The one way to write an artifact: into a temporary sibling, renamed into place only on success.

A stage that crashes, or is killed, leaves at most a ``.tmp-*`` sibling behind, never a
half-written file or directory under the real name that DVC could take for a finished output.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from rlhf_core.errors import DataError, first_line


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    """A fresh temporary sibling of ``path``, named ``.<name>.tmp-<host>-<pid>-…``.

    Stale siblings left by a killed earlier run are removed first: those of a process of this machine that
    no longer runs, and unnamed ones of older versions.  A live writer's sibling, and one of another machine
    (a shared filesystem), is left alone: removing it would break that writer's rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if _owner_is_gone(stale.name[len(f".{path.name}.tmp-"):]):
            _remove(stale)
    prefix = f".{path.name}.tmp-{_HOST}-{os.getpid()}-"
    # tempfile creates 0600 files and 0700 directories; an output gets the permissions any other file would
    # (0666 / 0777 less the umask), so teammates on a shared filesystem can read it.
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        return tmp
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_HOST = socket.gethostname().replace("-", "_") or "host"


def _owner_is_gone(suffix: str) -> bool:
    """Whether the writer named in a temporary sibling's ``<host>-<pid>-<random>`` suffix is gone for sure."""
    parts = suffix.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return True  # an older, unnamed temporary: its writer cannot be told, and it predates this scheme
    host, pid = parts[0], int(parts[1])
    if host != _HOST:
        return False  # another machine's writer: its liveness cannot be checked from here
    if pid == os.getpid():
        return True  # an earlier write of this very process that did not clean up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` whole, on error it is deleted."""
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=True)
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path; on success it replaces ``path``, on error it is deleted."""
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=False)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_finite(value, where: str = "") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where or 'value'} is {value}: metrics must be finite numbers")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}" if where else str(key))
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, f"{where}[{index}]")


def to_json_text(obj) -> str:
    """Deterministic JSON (sorted keys, fixed float repr) so that equal results give equal bytes."""
    _check_finite(obj)
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically, refusing NaN and inf."""
    text = to_json_text(obj)
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_into(directory: Path, name: str, obj) -> None:
    """Write JSON inside a directory that is itself being written atomically."""
    (directory / name).write_text(to_json_text(obj))


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; run the stage that produces it first (dvc repro)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _to_parquet(frame, path: Path) -> None:
    """Deterministic bytes: pyarrow, no pandas index (Parquet keeps no write timestamp)."""
    frame.to_parquet(path, index=False, engine="pyarrow")


def write_parquet(frame, path: str | Path) -> None:
    """Write a pandas DataFrame as Parquet atomically (deterministic bytes: no pandas index, no stats timestamps)."""
    with atomic_file(path) as tmp:
        _to_parquet(frame, tmp)


def write_parquet_into(directory: Path, name: str, frame) -> None:
    """Write a DataFrame as Parquet inside a directory that is itself being written atomically (the same bytes as
    ``write_parquet``): every stage writes its tables through here."""
    _to_parquet(frame, directory / name)


def read_parquet(path: str | Path, required_columns: tuple[str, ...] = ()):
    import pandas as pd
    import pyarrow

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; run the stage that produces it first (dvc repro)")
    try:
        frame = pd.read_parquet(path)
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(exc)[:200]}); "
                        "re-run the stage that produces it (dvc repro -f <stage>)") from None
    missing = [c for c in required_columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}")
    return frame


def repo_root(start: str | Path | None = None) -> Path:
    """The user's repository root, also from inside ``dvc exp run --temp``/``--queue`` copies.

    Those run in ``<root>/.dvc/tmp/exps/<tmpdir>``; results that must outlive the copy, such as the
    MLflow store, belong to ``<root>``.
    """
    here = Path(start or os.getcwd()).resolve()
    parts = here.parts
    for index in range(len(parts) - 3):
        if parts[index:index + 4] == (".dvc", "tmp", "exps", parts[index + 3]) and index > 0:
            return Path(*parts[:index])
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".dvc").is_dir():
            return candidate
    return here


STATE_FILE = "rlhf_state.json"


def checkpoint_dir(name: str) -> str:
    """models/<name>: `sft` is the reference snapshot, every other name a round's output."""
    return f"models/{name}"


def read_state(path: str | Path) -> dict:
    """The RL state carried from round to round in a checkpoint (KL coefficient, reward baseline,
    reward normalisers); {} for a checkpoint without one (sft, or any plain HF model)."""
    state_file = Path(path) / STATE_FILE
    return read_json(state_file) if state_file.is_file() else {}


# ---------------------------------------------------------------------------------------------------
# Tables: the user's prompt, demonstration and preference files and datasets, as pandas DataFrames

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def read_table_file(path: str | Path):
    """A local jsonl/json/parquet/csv file as a DataFrame."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (allowed: a {'/'.join(FILE_SUFFIXES)} file)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            return pd.read_json(path)
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path, keep_default_na=False)
    except ValueError as exc:
        raise DataError(f"{path}: cannot be read as {suffix[1:]} ({first_line(exc)})") from None
    raise DataError(f"{path}: unsupported file type {suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")


def read_hf_dataset(name: str, config: str, split: str):
    """A `datasets` dataset (hub id, or local directory / script) as a DataFrame."""
    import datasets

    try:
        if Path(name).is_dir() and (Path(name) / "dataset_info.json").exists():
            dataset = datasets.load_from_disk(name)
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # datasets raises many types; the user needs the one line
        raise DataError(f"dataset {name!r} (config {config or 'default'}, split {split}): cannot be loaded: "
                        f"{first_line(exc)}") from None
    return dataset.to_pandas()


def load_table(source: str, path: str, config: str, split: str):
    if source == "file":
        return read_table_file(path)
    if source == "hf":
        return read_hf_dataset(path, config, split)
    raise ValueError(f"unknown source {source!r}")


def text_column(frame, field: str, where: str) -> list[str]:
    if field not in frame.columns:
        raise DataError(f"{where}: no column {field!r}; columns are {', '.join(map(str, frame.columns))}")
    values = frame[field].tolist()
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(f"{where}: column {field!r} row {row} is {type(value).__name__}, expected text")
    return values
