"""Policy optimizers behind one interface: ``optimize(name)(model, experience, params, ...) -> metrics``.

Each algorithm is a small module with one training function for one round of data.
"""

from __future__ import annotations

from rlhf_core.errors import ConfigError

ALGORITHMS = ("ppo",)


def get_algorithm(name: str):
    """The training function of algorithm ``name``."""
    if name == "ppo":
        from rlhf_core.algorithms.ppo import train_ppo

        return train_ppo
    raise ConfigError(f"algorithm {name!r}: unknown; allowed: {', '.join(ALGORITHMS)}")
