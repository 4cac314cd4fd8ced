"""PPO losses on token tensors.  Imports only torch.

Every function takes right-padded [B, T] tensors and a float ``mask`` [B, T].  Losses are returned as
masked *sums* together with what is needed to normalise them, so that gradient accumulation over
micro-batches can divide by the token count of the whole minibatch (token-mean aggregation).
"""

from __future__ import annotations

import torch


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float, clip_range_high: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO policy loss (Schulman et al. 2017), with DAPO's clip-higher (Yu et al. 2025, arXiv 2503.14476)
    when ``clip_range_high`` is given:

        ρ_t = exp(log π_θ(a_t|s_t) − log π_old(a_t|s_t))
        L_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε_low, 1+ε_high))      ε_low = clip_range, ε_high = clip_range_high or ε_low

    A larger ε_high lets a token with A > 0 grow its probability further before the clip stops its gradient (low-
    probability tokens can rise: less entropy collapse); the bound for A < 0 is unchanged.
    Shapes: all [B, T].  Returns (loss, ratio, clipped: 1.0 where the clipped branch was taken).
    """
    high = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    return loss, ratio, (clipped > unclipped).float()


def cispo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, max_weight: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token CISPO loss (MiniMax-M1, arXiv 2506.13585; the cap as in ScaleRL and TRL): the importance weight is
    clipped and its gradient stopped, never the update, so every token keeps a gradient:

        ρ_t = exp(log π_θ − log π_old),    w_t = sg(min(ρ_t, ε_max))        ε_max = max_weight
        L_t = −w_t · A_t · log π_θ(a_t|s_t)          ∇L_t = −w_t · A_t · ∇log π_θ   (at ρ = 1: REINFORCE's)

    Shapes: all [B, T].  Returns (loss, ratio, capped: 1.0 where ρ_t > ε_max).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    weight = ratio.clamp(max=max_weight).detach()
    return -weight * advantages * logprobs, ratio, (ratio > max_weight).float()


def sapo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, tau_pos: float,
              tau_neg: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token SAPO loss (Soft Adaptive Policy Optimization, arXiv 2511.20347): a soft gate instead of the hard clip,

        ρ_t = exp(log π_θ − log π_old),    τ_t = τ_pos if A_t > 0 else τ_neg
        f(ρ) = (4/τ_t) · σ(τ_t (ρ − 1)),   L_t = −f(ρ_t) · A_t

    f(1) = 2/τ and f′(1) = 1, so at ρ = 1 the gradient is the policy gradient's; away from 1 it fades smoothly
    (f′(ρ) = 4 σ(1 − σ)) instead of dropping to 0 at 1 ± ε.  τ_neg > τ_pos fades negative updates faster.
    Shapes: all [B, T].  Returns (loss, ratio, gate f′(ρ_t) = 4σ(1 − σ): 1 on policy, → 0 far off it).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    return -(4.0 / tau) * gate * advantages, ratio, (4.0 * gate * (1.0 - gate)).detach()


def sampler_correction(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, *, mode: str,
                       level: str, cap: float, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollout–trainer mismatch correction: per-token weights on the policy loss when the tokens were drawn from a
    sampler μ (vLLM's kernels, a truncated top-k/top-p distribution) that differs from the trainer's π_old:

        log w_t = log π_old(a_t) − log μ(a_t)              token level
        log w_t = (1/|y|) Σ_s (log π_old − log μ)(a_s)      sequence level: one geometric-mean ratio per response
        tis  (truncated importance sampling):  c_t = min(w_t, cap)
        mis  (masked importance sampling, IcePop): c_t = 1 if low ≤ w_t ≤ high, else 0 (the token is dropped)

    so that E_μ[c·A·∇log π] follows E_π[A·∇log π] (exactly for tis below the cap).  The weights are constants (no
    gradient).  Shapes: all [B, T] (mask float).  Returns (c [B, T], 0 on padding; affected [B, T]: 1.0 where
    the cap bit (tis) or the token was dropped (mis)).
    """
    log_w = (old_logprobs - sampler_logprobs) * mask
    if level == "sequence":
        log_w = (log_w.sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(log_w)
    weights = torch.exp(log_w)
    if mode == "tis":
        return weights.clamp(max=cap) * mask, (weights > cap).float() * mask
    if mode == "mis":
        kept = ((weights >= low) & (weights <= high)).float()
        return kept * mask, (1.0 - kept) * mask
    raise ValueError(f"unknown sampler correction {mode!r}")


def sampler_mismatch(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the sampler μ is from the trainer π over the masked tokens (drawn from μ):

        kl                  mean_t [(r − 1) − log r],  r = π/μ: the k3 estimate of KL(μ‖π) per token, ≥ 0
        max_abs_logprob_diff  max_t |log π − log μ|

    [B, T] -> {name: float}."""
    log_r = (old_logprobs - sampler_logprobs)[mask.bool()]
    return {"kl": float((torch.expm1(log_r) - log_r).mean()) if log_r.numel() else 0.0,
            "max_abs_logprob_diff": float(log_r.abs().max()) if log_r.numel() else 0.0}


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


def dual_clip(loss: torch.Tensor, advantages: torch.Tensor, clip_c: float | None) -> torch.Tensor:
    """Dual-clip PPO (Ye et al. 2020): for A_t < 0 the clipped loss is further bounded by −c·A_t,

        L_t = min(L_t^clip, −c·A_t)   if A_t < 0,     L_t^clip otherwise      (c > 1)

    so a very large ratio on a bad action cannot produce an unbounded update.  [B,T] -> [B,T].
    """
    if clip_c is None:
        return loss
    return torch.where(advantages < 0, torch.minimum(loss, -clip_c * advantages), loss)


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One log-ratio per sequence, broadcast to its tokens (GSPO-style, length-normalised):

        log ρ_i = (1/|y_i|) Σ_t (log π_θ(y_i,t) − log π_old(y_i,t))

    [B,T] -> [B,T] (every token of row i carries log ρ_i).
    """
    per_token = (logprobs - old_logprobs) * mask
    per_sequence = per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_sequence.unsqueeze(-1).expand_as(logprobs)


def policy_gradient_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The REINFORCE / actor-critic loss per token: L_t = −A_t · log π_θ(a_t|s_t).  [B,T] -> [B,T]."""
    return -advantages * logprobs


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, *, total_tokens: float,
              total_sequences: float) -> torch.Tensor:
    """Reduce per-token losses of a micro-batch to its share of the minibatch loss.

    token_mean:          Σ_i Σ_t L_it / (tokens in the minibatch)
    seq_mean_token_mean: Σ_i [(1/|y_i|) Σ_t L_it] / (sequences in the minibatch)
    seq_mean_token_sum:  Σ_i [Σ_t L_it] / (sequences in the minibatch)

    Summing the returned values over the micro-batches of a minibatch gives the minibatch loss, so
    gradient accumulation is exact.  loss, mask: [B,T] -> scalar.
    """
    masked = loss * mask
    if mode == "token_mean":
        return masked.sum() / total_tokens
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / total_sequences
    if mode == "seq_mean_token_sum":
        return masked.sum() / total_sequences
    raise ValueError(f"unknown loss aggregation {mode!r}")
