"""CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance weight, not the update.

The advantages are GRPO's (group-normalised scores, the advantages stage); the update runs optim.epochs over the
round like PPO's, with the policy term

    L_t = −sg(min(ρ_t, ε_max)) · A_t · log π_θ(a_t|s_t)          ρ_t = π_θ / π_old,  ε_max = cispo.max_weight

PPO's clip zeroes the gradient of a token whose ratio left [1 − ε, 1 + ε_high], and those are often the rare
"fork" tokens of a long reasoning chain; CISPO keeps every token's gradient and only bounds its weight.  No critic;
KL as in grpo (kl.loss_coef in the loss, none in the reward); ppo.target_kl still stops the round early.
"""

from __future__ import annotations

from rlhf_core.algorithms.ppo import train_ppo


def train_cispo(model, experience, params, *, temperature: float, pad_id: int, device, seed: int, log=print,
                carry: dict | None = None) -> dict:
    return train_ppo(model, experience, params, temperature=temperature, pad_id=pad_id, device=device, seed=seed,
                     log=log, use_critic=False, name="cispo", carry=carry, objective="cispo")
