"""SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347): a soft gate in place of the hard clip.

The advantages are GRPO's (group-normalised scores, the advantages stage); the update runs optim.epochs over the
round like PPO's, with the policy term

    L_t = −(4/τ_t) · σ(τ_t (ρ_t − 1)) · A_t       ρ_t = π_θ / π_old,  τ_t = sapo.tau_pos if A_t > 0 else sapo.tau_neg

whose gradient is the policy gradient's at ρ = 1 and fades smoothly as ρ leaves 1, instead of stopping at the clip
edge; τ_neg > τ_pos damps negative updates (which spread probability over the vocabulary) faster.  No critic; KL
as in grpo (kl.loss_coef in the loss, none in the reward); ppo.target_kl still stops the round early.
"""

from __future__ import annotations

from rlhf_core.algorithms.ppo import train_ppo


def train_sapo(model, experience, params, *, temperature: float, pad_id: int, device, seed: int, log=print,
               carry: dict | None = None) -> dict:
    return train_ppo(model, experience, params, temperature=temperature, pad_id=pad_id, device=device, seed=seed,
                     log=log, use_critic=False, name="sapo", carry=carry, objective="sapo")
