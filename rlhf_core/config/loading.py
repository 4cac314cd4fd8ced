"""Reading params.yaml: YAML 1.2, keys that moved, and pydantic's errors as one line for a person."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from rlhf_core.config.rules import validate
from rlhf_core.config.sections import Params, Section
from rlhf_core.config.yaml12 import yaml_load
from rlhf_core.errors import ConfigError

# Keys that moved into optim: and kl: (one place per knob): an old params file gets one line naming the new key.
MOVED = {
    **{f"ppo.{name}": f"optim.{name}" for name in ("epochs", "minibatch_size", "micro_batch_size", "lr", "lr_schedule",
                                                   "warmup_steps", "adam_eps", "weight_decay", "max_grad_norm",
                                                   "loss_aggregation", "ent_coef", "vf_coef")},
    "ppo.kl_loss_coef": "kl.loss_coef", "ppo.kl_loss_estimator": "kl.loss_estimator", "grpo.kl_coef": "kl.loss_coef",
    "advantages.kl_coef": "kl.reward_coef", "advantages.kl_estimator": "kl.reward_estimator",
    "advantages.adaptive_kl": "kl.adaptive", "advantages.kl_target": "kl.target", "advantages.kl_horizon": "kl.horizon",
}
# Keys retired with what they configured: an old params file gets one line naming the replacement.
RETIRED = {
    "compute.main_process_ip": "the shared-filesystem follower is gone: several machines run on a Ray cluster (set "
                               "compute.launcher: ray and compute.ray_address; docs/scaling.md)",
}
# pydantic's error types, in the words of a params.yaml reader.
_WORDS = {"int_type": "must be an integer", "int_from_float": "must be an integer", "float_type": "must be a number",
          "finite_number": "must be a finite number", "bool_type": "must be true or false", "string_type": "must be a string",
          "string_too_short": "must not be empty", "tuple_type": "must be a list", "dict_type": "must be a mapping",
          "model_type": "must be a mapping of keys to values", "greater_than": "must be > {gt}",
          "greater_than_equal": "must be >= {ge}", "less_than": "must be < {lt}", "less_than_equal": "must be <= {le}",
          "string_pattern_mismatch": "must match {pattern}"}


def strip_annotated(tp):
    """``Annotated[X, ...]`` → X."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def is_section(tp) -> bool:
    # typing.get_origin first: on Python 3.10, tuple[...] and dict[...] are instances of type
    return typing.get_origin(tp) is None and isinstance(tp, type) and issubclass(tp, BaseModel)


def _first_error(errors: list[dict]) -> tuple[dict, str]:
    """pydantic's first error, and what else the key allows: an `auto`-or-number key (AutoCoef) fails in both
    branches of its union, and its number branch says what is wrong."""
    first = errors[0]
    if first["type"] == "literal_error" and first["loc"][-1] == "literal['auto']":
        number = next(error for error in errors[1:] if error["loc"][:-1] == first["loc"][:-1])
        return {**number, "loc": number["loc"][:-1]}, " or auto"
    return first, ""


def _message(errors: list[dict], root=None) -> str:
    """One line for pydantic's first error: the key as written in params.yaml, its value and what is allowed."""
    error, alternative = _first_error(errors)
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx", {})
    is_key = loc[-1:] == ("[key]",)  # a mapping's key (a round key, a reward model's name)
    loc = loc[:-2] if is_key else loc  # (…, mapping, its key, "[key]")
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".") or "params.yaml"
    if kind == "extra_forbidden":
        section = root or Params
        for part in loc[:-1]:  # down to the section holding the unknown key, through lists and mappings
            section = (strip_annotated(next(f.annotation for name, f in section.model_fields.items() if part in (name, f.alias)))
                       if is_section(section) else [a for a in typing.get_args(section) if a is not Ellipsis][-1])
        allowed = sorted(f.alias or name for name, f in section.model_fields.items())
        return f"{key}: unknown key; allowed keys are {', '.join(allowed)}"
    if kind == "literal_error":
        words = "must be one of " + ctx["expected"].replace(" or ", ", ")
    elif kind == "value_error":  # an AfterValidator's own words (algorithm.name)
        words = str(ctx["error"])
    else:
        words = _WORDS.get(kind, error["msg"][:1].lower() + error["msg"][1:]).format(**ctx) + alternative
    return f"{key}: the key {error['input']!r} {words}" if is_key else f"{key} = {error['input']!r}: {words}"


def params_from_dict(raw: dict) -> Params:
    """Validate a params tree (as read from params.yaml) into Params; ConfigError with one line on any problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: must be a mapping of keys to values, got {raw!r}")
    for old, new in MOVED.items():
        section_name, _, name = old.partition(".")
        if isinstance(raw.get(section_name), dict) and name in raw[section_name]:
            raise ConfigError(f"{old}: moved to {new} (what every algorithm's update loop uses is in optim:, "
                              "every KL setting in kl:)")
    for old, why in RETIRED.items():
        section_name, _, name = old.partition(".")
        if isinstance(raw.get(section_name), dict) and name in raw[section_name]:
            raise ConfigError(f"{old}: retired: {why}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_message(exc.errors())) from None
    return validate(params)


def replace(section: Section, /, **changes) -> Section:
    """A copy of the frozen ``section`` with ``changes``, each validated like a params.yaml value."""
    try:
        return type(section).model_validate({**dict(section), **changes})
    except ValidationError as exc:
        raise ConfigError(_message(exc.errors(), type(section))) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ConfigError with one readable line on any problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return params_from_dict(raw or {})


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'ppo': {'lr': 1}} -> {'ppo.lr': 1}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
