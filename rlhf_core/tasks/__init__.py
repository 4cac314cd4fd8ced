"""Built-in tasks: each provides ``prompts(count, seed)`` and ``demonstrations(count, seed)``."""

from __future__ import annotations

from types import ModuleType

from rlhf_core.errors import ConfigError

TASKS = ("sentiment",)


def get_task(name: str) -> ModuleType:
    if name == "sentiment":
        from rlhf_core.tasks import sentiment

        return sentiment
    raise ConfigError(f"task = {name!r}: must be one of {', '.join(TASKS)}")
