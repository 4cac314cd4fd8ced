"""Built-in tasks.  Each task module provides

    prompts(count, seed)        -> [{"prompt": str[, "answer": str]}]   (duplicates allowed)
    demonstrations(count, seed) -> [{"prompt": str, "response": str, ...}]
    preferences(count, seed)    -> [{"prompt": str, "chosen": str, "rejected": str}]
    reward(prompts, responses, metadata) -> one float per response   (the `kind: task` scorer)

and ``HAS_ANSWERS`` (whether its prompts carry a reference answer).  Everything is drawn from a seeded
``random.Random``, so the same seed always gives the same corpus.
"""

from __future__ import annotations

from types import ModuleType

from rlhf_core.errors import ConfigError


def get_task(name: str) -> ModuleType:
    if name == "sentiment":
        from rlhf_core.phases.tasks import sentiment

        return sentiment
    if name == "arithmetic":
        from rlhf_core.phases.tasks import arithmetic

        return arithmetic
    if name == "calculator":
        from rlhf_core.phases.tasks import calculator

        return calculator
    raise ConfigError(f"task = {name!r}: not a built-in task (rlhf_core.config.TASKS lists them)")
