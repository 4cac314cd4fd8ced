"""One round of any registered algorithm, with one signature: the update loop is chosen by its traits."""

from __future__ import annotations

from rlhf_core.rl.algorithms.registry import traits_of


def train_round(model, experience, params, *, temperature: float, pad_id: int, device, seed: int, log=print,
                carry: dict | None = None, critic_warmup_epochs: int = 0) -> dict:
    """One round of params.algorithm.name's updates on ``model`` in place; returns the round's metrics.

    The one signature of every algorithm: the update loop is chosen by the objective (trust region, one on-policy
    policy-gradient pass, or optim.epochs of a per-token objective), the critic and the KL by the traits."""
    traits, name = traits_of(params), params.algorithm.name
    common = dict(temperature=temperature, pad_id=pad_id, device=device, seed=seed, log=log)
    if traits.objective == "trust_region":
        from rlhf_core.rl.algorithms.trpo import train_trpo

        if carry is not None or critic_warmup_epochs:  # Params.validate refuses both (optim.carry_state, …)
            raise ValueError(f"{name} takes no AdamW step on the policy: no carried state, no critic warm-up")

        return train_trpo(model, experience, params, **common, line_search=traits.line_search, name=name)
    if traits.objective == "policy_gradient":
        from rlhf_core.rl.algorithms.reinforce import train_reinforce

        return train_reinforce(model, experience, params, **common, use_critic=traits.trains_critic, name=name,
                               carry=carry, critic_warmup_epochs=critic_warmup_epochs)
    from rlhf_core.rl.algorithms.ppo import train_ppo

    return train_ppo(model, experience, params, **common, use_critic=traits.trains_critic, name=name, carry=carry,
                     critic_warmup_epochs=critic_warmup_epochs, objective=traits.objective)
