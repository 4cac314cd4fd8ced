"""`rlhf rounds N`: rewrite the `rounds` block of params.yaml as text, leaving every other byte alone.

The YAML is not re-dumped (that would lose comments and formatting).  The top-level `rounds:` block
is found in the text and replaced: an existing entry that already says what round i must say
(`ri` from r(i-1), sft for r1) is kept verbatim with its comments, the others are dropped, and the
missing ones are written as `ri: {from: r(i-1)}` with the block's indentation.  The result is checked
(everything but `rounds` parses to the same values; load_params accepts it) before it atomically
replaces the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rlhf_core.errors import ConfigError
from rlhf_core.tooling.commands._common import params_path

_TOP_LEVEL_ROUNDS = re.compile(r"^rounds\s*:(?P<rest>.*)$")


def chained(n: int) -> dict[str, dict[str, str]]:
    return {f"r{i}": {"from": "sft" if i == 1 else f"r{i - 1}"} for i in range(1, n + 1)}


def _split_entries(body: list[str]) -> tuple[list[str], list[list[str]], str]:
    """(lines before the first entry, entries as lists of lines, entry indentation) of a block body."""
    indent = None
    for line in body:
        if line.strip() and not line.lstrip().startswith("#"):
            indent = line[: len(line) - len(line.lstrip())]
            break
    if indent is None:
        return body, [], "  "
    head, entries = [], []
    for line in body:
        starts_entry = (line.startswith(indent) and line.strip() and not line.lstrip().startswith("#")
                        and len(line) - len(line.lstrip()) == len(indent))
        if starts_entry:
            entries.append([line])
        elif entries:
            entries[-1].append(line)
        else:
            head.append(line)
    return head, entries, indent


def _entry_value(lines: list[str], indent: str):
    import yaml

    try:
        value = yaml.safe_load("".join(line[len(indent):] if line.startswith(indent) else line for line in lines))
    except yaml.YAMLError:
        return None
    return value if isinstance(value, dict) and len(value) == 1 else None


def rewrite_rounds(text: str, n: int) -> str:
    """params.yaml text with its `rounds` block for ``n`` chained rounds; every other line unchanged."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _TOP_LEVEL_ROUNDS.match(line.rstrip("\r\n"))]
    if len(starts) > 1:
        raise ConfigError(f"`rounds:` appears {len(starts)} times at the top level (lines "
                          f"{', '.join(str(i + 1) for i in starts)}); keep one")
    wanted = chained(n)
    if not starts:  # no rounds block (the default, r1 only, applies): append one
        prefix = text if not text or text.endswith("\n") else text + "\n"
        return prefix + "rounds:\n" + "".join(f"  {key}: {{from: {spec['from']}}}\n" for key, spec in wanted.items())

    start = starts[0]
    end = start + 1
    last_body = start  # the block ends at its last indented line; blank lines after it stay outside
    while end < len(lines):
        line = lines[end]
        if line.strip() and not line[0].isspace():
            break
        if line.strip():
            last_body = end
        end += 1
    end = last_body + 1
    header, body = lines[start], lines[start + 1:end]
    newline = "\r\n" if header.endswith("\r\n") else "\n"
    rest = _TOP_LEVEL_ROUNDS.match(header.rstrip("\r\n")).group("rest")
    if rest.strip() and not rest.strip().startswith("#"):
        # flow style on one line (`rounds: {r1: {from: sft}}  # note`): becomes a block, the comment kept
        comment = re.search(r"\s(#[^'\"{}]*)$", rest)
        header = "rounds:" + (f"  {comment.group(1)}" if comment else "") + newline
        head, entries, indent = [], [], "  "
    else:
        head, entries, indent = _split_entries(body)

    kept: dict[str, list[str]] = {}
    for entry in entries:
        value = _entry_value(entry, indent)
        if value is None:
            continue
        ((key, spec),) = value.items()
        if key in wanted and key not in kept and isinstance(spec, dict) and spec == wanted[key]:
            kept[key] = entry
    out = [header, *head]
    for key, spec in wanted.items():
        entry = kept.get(key) or [f"{indent}{key}: {{from: {spec['from']}}}{newline}"]
        if not entry[-1].endswith("\n"):
            entry = [*entry[:-1], entry[-1] + newline]
        out += entry
    if end == len(lines) and not lines[-1].endswith("\n"):  # the file ended without a newline: keep it so
        out[-1] = out[-1].rstrip("\r\n")
    return "".join(lines[:start] + out + lines[end:])


def _check_unchanged_elsewhere(old: str, new: str, n: int) -> None:
    from rlhf_core.config import yaml_load

    old_raw, new_raw = yaml_load(old) or {}, yaml_load(new) or {}
    old_raw.pop("rounds", None)
    rounds = new_raw.pop("rounds", None)
    if old_raw != new_raw or rounds != chained(n):  # a bug here, never the user's: refuse to write
        raise ConfigError("internal error: the rewritten params.yaml would change more than `rounds`; nothing written")


def run(args) -> None:
    from rlhf_core.config import load_params
    from rlhf_core.io import atomic_file

    if args.n < 1:
        raise ConfigError(f"N = {args.n}: the number of rounds must be >= 1")
    path = params_path(args)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run rlhf from the repository (the folder with dvc.yaml "
                          "and params.yaml) or pass --params PATH")
    import yaml

    from rlhf_core.config import yaml_load

    old = path.read_bytes().decode()
    try:
        raw = yaml_load(old) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"{path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}; fix it first") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a YAML mapping of params")
    before = list(raw["rounds"]) if isinstance(raw.get("rounds"), dict) else ["r1"]
    new = rewrite_rounds(old, args.n)
    _check_unchanged_elsewhere(old, new, args.n)
    if new == old:
        print(f"{_shown(path)}: already {args.n} round(s) ({', '.join(before)}); nothing to change")
        return
    with atomic_file(path) as tmp:
        tmp.write_bytes(new.encode())
        os.chmod(tmp, path.stat().st_mode & 0o7777)  # atomic_file's temporary file is 0600
        try:
            load_params(tmp)
        except ConfigError as exc:
            message = str(exc).replace(str(tmp), str(path))
            raise ConfigError((message if str(path) in message else f"{path}: {message}") + "; nothing written") from None
    after = chained(args.n)
    removed = [key for key in before if key not in after]
    chain = ", ".join(f"{key} from {spec['from']}" for key, spec in after.items())
    was = f"was {', '.join(before)}" + (f"; removed {', '.join(removed)}" if removed else "")
    print(f"{_shown(path)}: rounds {chain} ({was}). Next: `dvc repro`.")


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
