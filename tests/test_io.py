"""Unit tests of rlhf_core.io: atomic writes, strict JSON, readers and repo_root."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from rlhf_core.errors import DataError
from rlhf_core.io import (
    atomic_dir,
    atomic_file,
    read_json,
    read_parquet,
    repo_root,
    to_json_text,
    write_json,
    write_json_into,
    write_parquet,
)


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


# -- atomic_dir -------------------------------------------------------------------------------------

def test_atomic_dir_replaces_target_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path and tmp.is_dir()
        assert (target / "old.txt").read_text() == "old"  # untouched while writing
        (tmp / "new.txt").write_text("new")
        write_json_into(tmp, "m.json", {"a": 1})
    assert _names(target) == ["m.json", "new.txt"]
    assert (target / "new.txt").read_text() == "new"
    assert json.loads((target / "m.json").read_text()) == {"a": 1}
    assert _names(tmp_path) == ["out"]


def test_atomic_dir_creates_missing_target_and_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    assert (target / "x").read_text() == "1"
    assert _names(target.parent) == ["out"]


def test_atomic_dir_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("boom")
    assert _names(target) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert _names(tmp_path) == ["out"]  # no .out.tmp-* sibling left


def test_atomic_dir_error_without_previous_target_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
            raise KeyboardInterrupt
    assert _names(tmp_path) == []


# -- atomic_file ------------------------------------------------------------------------------------

def test_atomic_file_replaces_target_on_success(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with atomic_file(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert _names(tmp_path) == ["f.txt"]


def test_atomic_file_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_file(target) as tmp:
            tmp.write_text("half-written")
            raise ValueError("stop")
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["f.txt"]


def test_atomic_file_error_without_previous_target_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
            raise ValueError
    assert _names(tmp_path) == []


# -- JSON -------------------------------------------------------------------------------------------

def test_write_json_round_trip(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json(path, {"b": 1.5, "a": [1, 2], "c": {"z": None, "y": "s"}})
    assert read_json(path) == {"a": [1, 2], "b": 1.5, "c": {"y": "s", "z": None}}
    assert _names(path.parent) == ["m.json"]


@pytest.mark.parametrize("obj, where", [
    ({"loss": float("nan")}, "loss"),
    ({"a": {"b": [1.0, float("inf")]}}, "a.b[1]"),
    ([0.0, float("-inf")], "[1]"),
])
def test_write_json_refuses_non_finite_and_leaves_no_file(tmp_path, obj, where):
    path = tmp_path / "m.json"
    with pytest.raises(DataError) as info:
        write_json(path, obj)
    assert where in str(info.value)
    assert _names(tmp_path) == []


def test_write_json_refusal_keeps_previous_file(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"ok": 1})
    with pytest.raises(DataError):
        write_json(path, {"ok": math.nan})
    assert read_json(path) == {"ok": 1}
    assert _names(tmp_path) == ["m.json"]


def test_to_json_text_is_deterministic_with_sorted_keys():
    first = to_json_text({"b": 1, "a": {"d": 2.5, "c": [3, 1]}})
    second = to_json_text({"a": {"c": [3, 1], "d": 2.5}, "b": 1})
    assert first == second
    assert first == '{\n  "a": {\n    "c": [\n      3,\n      1\n    ],\n    "d": 2.5\n  },\n  "b": 1\n}\n'


def test_read_json_missing_file_names_the_path(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(DataError, match="missing.json"):
        read_json(path)


def test_read_json_bad_json_names_the_path(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(DataError) as info:
        read_json(path)
    assert str(path) in str(info.value)


# -- Parquet ----------------------------------------------------------------------------------------

def test_parquet_round_trip_and_required_columns(tmp_path):
    path = tmp_path / "t.parquet"
    frame = pd.DataFrame({"prompt": ["a", "b"], "score": [0.5, -1.0]})
    write_parquet(frame, path)
    back = read_parquet(path, required_columns=("prompt", "score"))
    pd.testing.assert_frame_equal(back, frame)
    assert _names(tmp_path) == ["t.parquet"]


def test_read_parquet_missing_file_names_the_path(tmp_path):
    path = tmp_path / "missing.parquet"
    with pytest.raises(DataError) as info:
        read_parquet(path)
    assert str(path) in str(info.value)


def test_read_parquet_missing_column_names_path_and_column(tmp_path):
    path = tmp_path / "t.parquet"
    write_parquet(pd.DataFrame({"prompt": ["a"]}), path)
    with pytest.raises(DataError) as info:
        read_parquet(path, required_columns=("prompt", "response"))
    message = str(info.value)
    assert str(path) in message and "response" in message
    assert "\n" not in message


# -- repo_root --------------------------------------------------------------------------------------

def test_repo_root_from_inside_a_dvc_exp_temp_copy(tmp_path):
    root = tmp_path.resolve() / "root"
    inner = root / ".dvc" / "tmp" / "exps" / "tmpabc" / "sub"
    inner.mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / ".dvc" / "tmp" / "exps" / "tmpabc" / "dvc.yaml").write_text("stages: {}\n")  # the copy has one too
    assert repo_root(inner) == root
    assert repo_root(inner.parent) == root


def test_repo_root_from_a_subdirectory(tmp_path):
    root = tmp_path.resolve() / "proj"
    sub = root / "a" / "b"
    sub.mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    assert repo_root(sub) == root
    assert repo_root(root) == root
    assert repo_root(str(sub)) == root


def test_repo_root_finds_dot_dvc_directory(tmp_path):
    root = tmp_path.resolve() / "proj"
    (root / ".dvc").mkdir(parents=True)
    (root / "x").mkdir()
    assert repo_root(root / "x") == root


def test_repo_root_defaults_to_cwd(tmp_path, monkeypatch):
    root = tmp_path.resolve() / "proj"
    (root / "s").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(root / "s")
    assert repo_root() == root


def test_stale_temporary_siblings_of_a_killed_run_are_removed(tmp_path):
    from rlhf_core.io import atomic_dir, atomic_file

    (tmp_path / ".out.tmp-abc123").mkdir()
    (tmp_path / ".out.tmp-abc123" / "half-written").write_text("x")
    (tmp_path / ".m.json.tmp-zz").write_text("{")
    with atomic_dir(tmp_path / "out") as out:
        (out / "done").write_text("ok")
    with atomic_file(tmp_path / "m.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "out"]


def test_a_live_writers_temporary_sibling_is_left_alone(tmp_path):
    """Two processes writing the same output (a 2-process stage did): each one's temporary directory survives
    the other's start, so neither rename fails; a dead process's leftover of this machine is still removed."""
    import subprocess
    import sys

    from rlhf_core.io import _HOST, atomic_dir

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        live = tmp_path / f".out.tmp-{_HOST}-{sleeper.pid}-abc"
        gone = tmp_path / f".out.tmp-{_HOST}-{int(dead.stdout)}-def"
        elsewhere = tmp_path / ".out.tmp-otherhost-1-ghi"  # another machine on a shared filesystem
        for sibling in (live, gone, elsewhere):
            sibling.mkdir()
        with atomic_dir(tmp_path / "out") as out:
            (out / "done").write_text("ok")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, elsewhere.name])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_first_line_of_a_library_error():
    from rlhf_core.errors import first_line

    assert first_line(ValueError("Couldn't instantiate the tokenizer:\n(1) a file\n(2) …")) == \
        "Couldn't instantiate the tokenizer:"
    assert first_line(OSError("  \n")) == "OSError" and first_line(KeyError()) == "KeyError"


def test_outputs_get_the_usual_permissions_not_tempfiles_private_ones(tmp_path):
    """tempfile's 0600/0700 made every output unreadable to teammates on a shared filesystem."""
    import os
    import stat

    from rlhf_core.io import atomic_dir, atomic_file

    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "metrics.json") as tmp:
            tmp.write_text("{}")
        with atomic_dir(tmp_path / "model") as out:
            (out / "weights.bin").write_bytes(b"0")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "model/weights.bin").stat().st_mode) == 0o644


def test_every_table_a_stage_writes_goes_through_io():
    """io.write_parquet's deterministic bytes were promised, but the six stage writes called DataFrame.to_parquet
    themselves; now only rlhf_core/io.py calls it (write_parquet, write_parquet_into)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    callers = [str(path.relative_to(repo)) for folder in ("stages", "rlhf_core") for path in (repo / folder).rglob("*.py")
               if re.search(r"\.to_parquet\(", path.read_text()) and path.name != "io.py"]
    assert callers == []
