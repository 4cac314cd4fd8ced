"""Errors meant for people: each carries one line that says what is wrong and what is allowed."""


class RLHFError(Exception):
    """Base class: a stage catches it, prints its one line and exits non-zero without writing outputs."""


class ConfigError(RLHFError):
    """A param is missing, unknown, of the wrong type or out of range."""


class DataError(RLHFError):
    """An input file, dataset or value is unusable (missing, empty, malformed, NaN)."""
