"""RLOO (Kool et al. 2019; Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline.

The advantages stage gives every token of response i the same A_i = R_i − (1/(k−1)) Σ_{j≠i} R_j, where
R is the sequence reward (score − β·KL) and j runs over the other samples of the same prompt.  The
update is the plain policy gradient (rloo.objective: reinforce) or PPO's clipped surrogate (clipped);
no critic either way.
"""

from __future__ import annotations

from rlhf_core.algorithms.ppo import train_ppo
from rlhf_core.algorithms.reinforce import train_reinforce


def train_rloo(model, experience, params, *, temperature: float, pad_id: int, device, seed: int, log=print,
               carry: dict | None = None) -> dict:
    if params.rloo.objective == "clipped":
        return train_ppo(model, experience, params, temperature=temperature, pad_id=pad_id, device=device,
                         seed=seed, log=log, use_critic=False, name="rloo", carry=carry)
    return train_reinforce(model, experience, params, temperature=temperature, pad_id=pad_id, device=device,
                           seed=seed, log=log, use_critic=False, name="rloo", carry=carry)
