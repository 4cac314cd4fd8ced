"""Policy optimizers behind one interface.

    train = get_algorithm(params.algorithm.name)
    metrics = train(model, experience, params, temperature=…, pad_id=…, device=…, seed=…, log=…)

Each algorithm is a small module with one training function for one round of data:

    reinforce, a2c   algorithms/reinforce.py   policy gradient (+ learned value and GAE for a2c)
    ppo              algorithms/ppo.py         clipped surrogate, clipped value loss, dual clip, KL loss
    trpo, npg        algorithms/trpo.py        conjugate gradient on Fisher-vector products, KL trust region
    grpo             algorithms/grpo.py        group-normalised advantages, clipped ratio, k3 KL loss
    rloo             algorithms/rloo.py        leave-one-out baseline, plain or clipped objective
    cispo            algorithms/cispo.py       grpo's advantages, clipped and stopped importance weight on −A·log π
    sapo             algorithms/sapo.py        grpo's advantages, a soft sigmoid gate instead of the clip
    reinforce_pp     algorithms/reinforce_pp.py  reward-to-go with KL in the reward, batch-normalised, clipped ratio
"""

from __future__ import annotations

from rlhf_core.config import ALGORITHMS
from rlhf_core.errors import ConfigError


def get_algorithm(name: str):
    """The training function of algorithm ``name``."""
    if name == "ppo":
        from rlhf_core.algorithms.ppo import train_ppo
        return train_ppo
    if name in ("reinforce", "a2c"):
        from rlhf_core.algorithms.reinforce import train_reinforce
        return train_reinforce
    if name in ("trpo", "npg"):
        from rlhf_core.algorithms.trpo import train_trpo
        return train_trpo
    if name == "grpo":
        from rlhf_core.algorithms.grpo import train_grpo
        return train_grpo
    if name == "rloo":
        from rlhf_core.algorithms.rloo import train_rloo
        return train_rloo
    if name == "cispo":
        from rlhf_core.algorithms.cispo import train_cispo
        return train_cispo
    if name == "sapo":
        from rlhf_core.algorithms.sapo import train_sapo
        return train_sapo
    if name == "reinforce_pp":
        from rlhf_core.algorithms.reinforce_pp import train_reinforce_pp
        return train_reinforce_pp
    raise ConfigError(f"algorithm.name = {name!r}: must be one of {', '.join(ALGORITHMS)}")
