"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, a clipped ratio, KL in the loss.

The advantages stage gives every token of response i the same Â_i = (r_i − mean_g r) / (std_g r + ε)
over the k samples of its prompt (no std: Dr. GRPO).  The update is PPO's clipped surrogate with no
critic, no KL in the reward, and β·k3(π_θ, π_ref) in the loss (grpo.kl_coef); epochs, batching,
clipping and the optimizer come from ppo.*.
"""

from __future__ import annotations

from dataclasses import replace

from rlhf_core.algorithms.ppo import train_ppo


def train_grpo(model, experience, params, *, temperature: float, pad_id: int, device, seed: int, log=print) -> dict:
    ppo = replace(params.ppo, vf_coef=0.0, kl_loss_coef=params.grpo.kl_coef, kl_loss_estimator="k3")
    return train_ppo(model, experience, replace(params, ppo=ppo), temperature=temperature, pad_id=pad_id,
                     device=device, seed=seed, log=log, use_critic=False, name="grpo")
