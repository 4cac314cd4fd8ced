"""PPO losses on token tensors.  Imports only torch.

Every function takes right-padded [B, T] tensors and a float ``mask`` [B, T].  Losses are returned as
masked *sums* together with what is needed to normalise them, so that gradient accumulation over
micro-batches can divide by the token count of the whole minibatch (token-mean aggregation).
"""

from __future__ import annotations

import torch


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO policy loss (Schulman et al. 2017):

        ρ_t = exp(log π_θ(a_t|s_t) − log π_old(a_t|s_t))
        L_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε))

    Returns (loss [B,T], ratio [B,T], clipped [B,T] as 1.0 where the clipped branch was taken).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    return loss, ratio, (clipped > unclipped).float()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss (as in OpenAI baselines / lm-human-preferences):

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        L_t    = ½ · max((V − R)², (V_clip − R)²)

    Returns (loss [B,T], clipped [B,T] as 1.0 where the clipped branch was larger).
    """
    values_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    return 0.5 * torch.maximum(loss_unclipped, loss_clipped), (loss_clipped > loss_unclipped).float()


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_old‖π_θ) from samples of π_old: (ρ − 1) − log ρ, ρ = π_θ/π_old."""
    log_ratio = logprobs - old_logprobs
    return torch.expm1(log_ratio) - log_ratio


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()
