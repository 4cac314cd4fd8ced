"""REINFORCE (Williams 1992) and advantage actor-critic on language models.

The advantages come from the advantages stage: G − b for reinforce (sequence return or reward-to-go,
with no baseline, a moving-average baseline or a leave-one-out baseline), GAE(γ, λ) with a learned
value for a2c.  One on-policy pass over the round's data in optim.minibatch_size minibatches:

    L^π_t = −w_t · A_t · log π_θ(a_t | s_t)              (the score-function gradient estimator; w_t = 1, or the
                                                          rollout_correction weight of π_old/μ)
    L^V_t = ½ (V_θ(s_t) − R_t)²                          (a2c only)
    L^KL_t = k(log π_θ, log π_ref)                       (only when kl.loss_coef > 0)
    loss  = agg(L^π) + vf_coef·agg(L^V) − ent_coef·agg(H) + kl.loss_coef·agg(L^KL)
"""

from __future__ import annotations

from rlhf_core.rl.algorithms.common import add_kl_loss, corrected, minibatch_updates
from rlhf_core.rl.losses import aggregate, approx_kl, masked_sum, policy_gradient_loss


def reinforce_loss(out, micro, totals, params, *, use_critic: bool):
    mask, optim = micro.mask, params.optim

    def agg(values):
        return aggregate(values, mask, optim.loss_aggregation, total_tokens=totals["tokens"],
                         total_sequences=totals["sequences"])

    pg_loss = corrected(policy_gradient_loss(out.logprobs, micro.advantages), micro)  # rollout_correction
    loss = agg(pg_loss) - optim.ent_coef * agg(out.entropy)
    stats = {"policy_loss": masked_sum(pg_loss, mask), "entropy": masked_sum(out.entropy, mask),
             "approx_kl": masked_sum(approx_kl(out.logprobs, micro.old_logprobs), mask)}
    if use_critic:
        vf_loss = 0.5 * (out.values - micro.returns) ** 2
        loss = loss + optim.vf_coef * agg(vf_loss)
        stats["value_loss"] = masked_sum(vf_loss, mask)
    return add_kl_loss(loss, stats, out, micro, params.kl_loss_coef, params.kl.loss_estimator, agg), stats


def train_reinforce(model, experience, params, *, temperature: float, pad_id: int, device, seed: int, log=print,
                    use_critic: bool, name: str, carry: dict | None = None, critic_warmup_epochs: int = 0) -> dict:
    """One on-policy pass of the policy gradient (with a learned value when ``use_critic``: a2c)."""
    return minibatch_updates(
        model, experience, params, epochs=1, temperature=temperature, pad_id=pad_id, device=device, seed=seed,
        log=log, name=name, carry=carry, critic_warmup_epochs=critic_warmup_epochs,
        loss_fn=lambda out, micro, totals: reinforce_loss(out, micro, totals, params, use_critic=use_critic))
