"""REINFORCE++ (Hu et al. 2025, arXiv 2501.03262): REINFORCE with PPO's tricks and no critic.

The advantages stage builds token rewards r_t = −β·kl_t plus the score on the last token (kl.reward_coef,
kl.reward_estimator), their reward-to-go G_t = Σ_{s ≥ t} γ^{s−t} r_s, and normalises G over the whole batch:
A_t = (G_t − mean) / std, a global baseline instead of a learned value or a per-prompt one.  With
reinforce_pp.baseline: group_mean ("REINFORCE++-baseline") each score first loses the mean score of its prompt's
samples.  The update is PPO's clipped surrogate over optim.epochs (ppo.*), with no value loss.
"""

from __future__ import annotations

from rlhf_core.algorithms.ppo import train_ppo


def train_reinforce_pp(model, experience, params, *, temperature: float, pad_id: int, device, seed: int, log=print,
                       carry: dict | None = None) -> dict:
    return train_ppo(model, experience, params, temperature=temperature, pad_id=pad_id, device=device, seed=seed,
                     log=log, use_critic=False, name="reinforce_pp", carry=carry)
