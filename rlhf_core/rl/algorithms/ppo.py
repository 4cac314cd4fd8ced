"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Huang et al. 2024).

One round of updates (the loop itself is ``common.minibatch_updates``):

    for epoch in 1..optim.epochs, for each shuffled minibatch, for each micro-batch:
        log π_θ, H, V_θ  ← forward (same code and temperature as the rollout)
        ρ_t   = exp(log π_θ − log π_old)           (or one ρ per sequence: ratio_level = sequence)
        L^π_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε_high))  [then min(·, −c A_t) where A_t < 0: dual clip]
        L^V_t = ½ max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²)
        L^π_t ← w_t · L^π_t                          (rollout_correction: w = tis / mis weights of π_old/μ)
        L^KL_t = k(log π_θ, log π_ref)               (only when kl.loss_coef > 0; k = kl.loss_estimator)
        loss  = agg(L^π) + vf_coef·agg(L^V) − ent_coef·agg(H) + kl.loss_coef·agg(L^KL)
    stop the round when the minibatch's approx-KL(π_old‖π_θ) exceeds ppo.target_kl

``agg`` is optim.loss_aggregation: token-mean, sequence-mean of token-means or of token-sums; vf_coef and
ent_coef are optim's; ε, ε_high (clip-higher; ε when unset), ε_v, c, the ratio level and target_kl are ppo's.
"""

from __future__ import annotations

import torch

from rlhf_core.rl.algorithms.common import add_kl_loss, corrected, minibatch_updates
from rlhf_core.rl.losses import (
    aggregate,
    approx_kl,
    cispo_loss,
    clipped_surrogate,
    clipped_value_loss,
    dual_clip,
    masked_sum,
    sapo_loss,
    sequence_log_ratio,
)


def clipped_term(out, micro, params):
    """max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε_high)), then dual clip; ρ per token or per sequence (ppo.*)."""
    ppo = params.ppo
    if ppo.ratio_level == "sequence":
        log_ratio = sequence_log_ratio(out.logprobs, micro.old_logprobs, micro.mask)
        logprobs_for_ratio = micro.old_logprobs + log_ratio
    else:
        logprobs_for_ratio = out.logprobs
    pg_loss, ratio, clipped = clipped_surrogate(logprobs_for_ratio, micro.old_logprobs, micro.advantages,
                                                ppo.clip_range, ppo.clip_range_high)
    return dual_clip(pg_loss, micro.advantages, ppo.dual_clip), ratio, ("clip_fraction", clipped)


def cispo_term(out, micro, params):
    """−sg(min(ρ, ε_max)) · A · log π_θ (cispo.max_weight; MiniMax-M1): every token keeps its gradient, only its
    weight is capped, where the clip would zero the gradient of rare "fork" tokens of a long reasoning chain."""
    pg_loss, ratio, capped = cispo_loss(out.logprobs, micro.old_logprobs, micro.advantages, params.cispo.max_weight)
    return pg_loss, ratio, ("clip_fraction", capped)


def sapo_term(out, micro, params):
    """−(4/τ) σ(τ(ρ − 1)) · A, τ = sapo.tau_pos or sapo.tau_neg by the sign of A (SAPO): the policy gradient's at
    ρ = 1, fading smoothly as ρ leaves 1 instead of stopping at a clip edge."""
    pg_loss, ratio, gate = sapo_loss(out.logprobs, micro.old_logprobs, micro.advantages, params.sapo.tau_pos,
                                     params.sapo.tau_neg)
    return pg_loss, ratio, ("gate_mean", gate)


# Per-token policy objectives by name (the registry's Traits.objective for the optim.epochs loop below): each
# (forward output, MicroBatch, params) -> ([B, T] loss, [B, T] ratio ρ_t, (stat name, [B, T] stat values)).
OBJECTIVES = {"clipped": clipped_term, "cispo": cispo_term, "sapo": sapo_term}


def ppo_loss(out, micro, totals, params, *, use_critic: bool = True, objective: str = "clipped"):
    """The PPO loss of one micro-batch (already scaled to its share of the minibatch) and its stat sums; the policy
    term is ``OBJECTIVES[objective]``'s."""
    mask, ppo, optim = micro.mask, params.ppo, params.optim
    pg_loss, ratio, (stat_name, stat_values) = OBJECTIVES[objective](out, micro, params)
    pg_loss = corrected(pg_loss, micro)  # rollout_correction: tis / mis weights (sampler ≠ trainer)

    def agg(values):
        return aggregate(values, mask, optim.loss_aggregation, total_tokens=totals["tokens"],
                         total_sequences=totals["sequences"])

    loss = agg(pg_loss) - optim.ent_coef * agg(out.entropy)
    stats = {"policy_loss": masked_sum(pg_loss, mask), "entropy": masked_sum(out.entropy, mask),
             stat_name: masked_sum(stat_values, mask), "ratio_mean": masked_sum(ratio, mask),
             "approx_kl": masked_sum(approx_kl(out.logprobs, micro.old_logprobs), mask)}
    if use_critic and optim.vf_coef > 0:
        vf_loss, vf_clipped = clipped_value_loss(out.values, micro.old_values, micro.returns, ppo.value_clip_range)
        loss = loss + optim.vf_coef * agg(vf_loss)
        stats.update(value_loss=masked_sum(vf_loss, mask), value_clip_fraction=masked_sum(vf_clipped, mask))
    loss = add_kl_loss(loss, stats, out, micro, params.kl_loss_coef, params.kl.loss_estimator, agg)
    real = mask.bool()
    with torch.no_grad():
        stats["max_ratio"] = ratio[real].max()
        stats["max_ratio_deviation"] = (ratio[real] - 1.0).abs().max()
    return loss, stats


def train_ppo(model, experience, params, *, temperature: float, pad_id: int, device, seed: int, log=print,
              use_critic: bool = True, name: str = "ppo", carry: dict | None = None,
              critic_warmup_epochs: int = 0, objective: str = "clipped") -> dict:
    """One round of PPO updates on ``model`` in place (the policy term: ``objective``); returns the round's
    diagnostics."""
    ppo = params.ppo

    def beyond_target_kl(stats):
        """approx-KL passed ppo.target_kl:"""
        return ppo.target_kl is not None and stats["approx_kl"] > ppo.target_kl

    metrics = minibatch_updates(
        model, experience, params, epochs=params.optim.epochs, temperature=temperature, pad_id=pad_id, device=device,
        seed=seed, log=log, name=name, stop_fn=beyond_target_kl, carry=carry, critic_warmup_epochs=critic_warmup_epochs,
        loss_fn=lambda out, micro, totals: ppo_loss(out, micro, totals, params, use_critic=use_critic,
                                                    objective=objective))
    # On an unchanged policy the first minibatch must see ratio 1 and approx-KL 0 (rollout and training agree).
    metrics["first_minibatch_ratio_max_deviation"] = metrics.pop("first_minibatch_max_ratio_deviation", 0.0)
    return metrics
