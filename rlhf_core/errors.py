"""Errors meant for people: each carries one line that says what is wrong and what is allowed."""


class RLHFError(Exception):
    """Base class: a stage catches it, prints its one line and exits non-zero without writing outputs."""


class ConfigError(RLHFError):
    """A param is missing, unknown, of the wrong type or out of range."""


class DataError(RLHFError):
    """An input file, dataset or value is unusable (missing, empty, malformed, NaN)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), to quote a
    library's error inside one of ours without its tracebacks or multi-line hints."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
