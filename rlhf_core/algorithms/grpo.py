"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, a clipped ratio, KL in the loss.

The advantages stage gives every token of response i the same Â_i = (r_i − mean_g r) / (std_g r + ε)
over the k samples of its prompt (no std: Dr. GRPO).  The update is PPO's clipped surrogate with no
critic, no KL in the reward (kl.reward_coef must be 0), and kl.loss_coef · k(π_θ, π_ref) in the loss (the
paper: 0.04 with k3, kl.loss_estimator's default); epochs, batching and the optimizer come from optim.*, the
clipping from ppo.*.
"""

from __future__ import annotations

from rlhf_core.algorithms.ppo import train_ppo


def train_grpo(model, experience, params, *, temperature: float, pad_id: int, device, seed: int, log=print,
               carry: dict | None = None) -> dict:
    return train_ppo(model, experience, params, temperature=temperature, pad_id=pad_id, device=device, seed=seed,
                     log=log, use_critic=False, name="grpo", carry=carry)
