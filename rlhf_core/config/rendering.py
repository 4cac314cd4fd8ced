"""params.yaml and docs/params.md from the params tree: used by the docs and the tests only, so that no stage's
code fingerprint covers it (a help string edited here re-runs nothing)."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from rlhf_core.config.loading import is_section, strip_annotated
from rlhf_core.config.sections import Params, RewardModelParams, ScorerParams
from rlhf_core.config.yaml12 import yaml_scalar


def _describe(tp) -> str:
    tp = strip_annotated(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a string or a list of strings"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def schema_rows(cls=None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every leaf field, depth first: the params reference."""
    cls = cls or Params
    rows, defaults = [], cls()
    for name, f in cls.model_fields.items():
        key, tp = prefix + (f.alias or name), strip_annotated(f.annotation)
        if is_section(tp):
            rows += schema_rows(tp, key + ".")
        elif name == "rounds":
            rows.append((key, "mapping", {"r1": {"from": "sft"}}, f.description))
        elif name == "scorers":
            rows.append((key, "list", [{"name": "task", "kind": "task"}], f.description))
            rows += schema_rows(ScorerParams, key + "[].")
        elif name == "reward_models":
            rows.append((key, "mapping", {}, f.description))
            rows += schema_rows(RewardModelParams, key + ".<name>.")
        else:
            rows.append((key, _describe(f.annotation), getattr(defaults, name), f.description))
    return rows


def _scorer_fields(scorer: "ScorerParams") -> dict:
    """The scorer's keys that matter for its kind (defaults of other kinds are left out)."""
    kind_keys = {"length": ("target_length",), "overlong": ("buffer",), "verifiable": ("match", "tolerance"), "python": ("function",),
                 "hf_classifier": ("model", "ensemble", "label", "output", "text", "batch_size", "max_length", "device",
                                   "allow_untrained_head")}
    keys = ("name", "kind", "weight", "normalize", "clip", *kind_keys.get(scorer.kind, ()))
    return {key: list(value) if isinstance(value := getattr(scorer, key), tuple) else value for key in keys}


def render_params_yaml(params: Params | None = None) -> str:
    """params.yaml text for ``params`` (defaults if None), every key documented in a comment."""
    params = params or Params()
    lines: list[str] = []

    def emit(obj, indent: int):
        pad = "  " * indent
        for name, f in type(obj).model_fields.items():
            value, doc = getattr(obj, name), f.description
            if is_section(strip_annotated(f.annotation)):
                lines.append(f"{pad}{name}:  # {doc}")
                emit(value, indent + 1)
            elif name == "reward_models":
                lines.append(f"{pad}reward_models:{' {}' if not value else ''}  # {doc}")
                for key, spec in value.items():
                    changed = {k: v for k, v in spec.model_dump(mode="json").items() if v != getattr(RewardModelParams(), k)}
                    lines.append(f"{pad}  {key}: {yaml_scalar(changed)}")
            elif name == "rounds":
                lines.extend([f"{pad}# {doc}", f"{pad}rounds:"])
                lines.extend(f"{pad}  {key}: {{from: {spec.start_from}}}" for key, spec in value.items())
            elif name == "scorers":
                lines.append(f"{pad}{name}:  # {doc} (every scorer key: docs/params.md)")
                lines.extend(f"{pad}  - {yaml_scalar(_scorer_fields(scorer))}" for scorer in value)
            else:
                lines.append(f"{pad}{name}: {yaml_scalar(value)}  # {doc}")
        if indent == 0:
            lines.append("")

    emit(params, 0)
    return "\n".join(lines)
