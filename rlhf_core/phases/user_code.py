"""The user's own code, named in params.yaml as ``module:name`` (a python scorer, an environment)."""

from __future__ import annotations

import importlib

from rlhf_core.errors import DataError


def import_attribute(spec: str, where: str, noun: str):
    """The callable ``module:name`` names, its module importable from the repository root or the environment; else
    one line starting with ``where`` and the spec, saying that the module does not import or has no such ``noun``."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"{where} {spec!r}: cannot import {module_name!r} ({exc})") from None
    value = getattr(module, attribute, None)
    if not callable(value):
        raise DataError(f"{where} {spec!r}: {module_name} has no {noun} {attribute!r}")
    return value
