"""YAML as DVC reads and writes it (YAML 1.2 core schema), and one value as YAML for a message or a comment."""

from __future__ import annotations

import functools
import re


def yaml_load(text: str):
    """Parse YAML as DVC does (YAML 1.2 core schema): only true/false are booleans, so `no`, `on` or
    `yes` stay strings, and `1e-5` is a number.  PyYAML's safe_load follows YAML 1.1, which reads an
    unquoted `no` as false; `dvc exp run -S` rewrites params.yaml with a YAML 1.2 dumper that drops
    the quotes of 'no', so safe_load would read back a different value than DVC wrote."""
    import yaml

    return yaml.load(text, Loader=_yaml12_loader())


@functools.cache
def _yaml12_loader():
    import yaml

    class Yaml12Loader(yaml.SafeLoader):
        """SafeLoader with YAML 1.2's booleans and floats (its own resolver table, the base class's untouched)."""

    Yaml12Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Yaml12Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                       list("tTfF"))
    Yaml12Loader.add_implicit_resolver(
        _FLOAT_TAG, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return Yaml12Loader


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"


def yaml_scalar(value) -> str:
    """``value`` as a one-line YAML scalar or flow collection: `null`, `0.5`, `[a, b]`."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("...").strip()
