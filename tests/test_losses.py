"""Unit tests of rlhf_core.rl.losses: the clipped PPO surrogate, the clipped value loss and approx-KL."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.rl.losses import approx_kl, clipped_surrogate, clipped_value_loss, masked_sum


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_clipped_surrogate_by_hand():
    # ε = 0.2, so the ratio is kept in [0.8, 1.2]
    ratios = _t(1.1, 1.5, 0.5, 0.5, 1.5, 0.9)
    advantages = _t(1.0, 1.0, 1.0, -1.0, -1.0, -2.0)
    old = _t(-1.0, -2.0, -0.5, -3.0, -1.5, -0.7)
    logprobs = old + ratios.log()
    loss, ratio, clipped = clipped_surrogate(logprobs, old, advantages, 0.2)
    assert torch.allclose(ratio, ratios, atol=1e-12)
    # L = max(−A·ρ, −A·clip(ρ, 0.8, 1.2))
    # A=+1, ρ=1.1 (inside)       : max(−1.1, −1.1) = −1.1   unclipped
    # A=+1, ρ=1.5 (above)        : max(−1.5, −1.2) = −1.2   clipped (no gain beyond 1+ε)
    # A=+1, ρ=0.5 (below)        : max(−0.5, −0.8) = −0.5   unclipped (pessimistic branch)
    # A=−1, ρ=0.5 (below)        : max( 0.5,  0.8) =  0.8   clipped
    # A=−1, ρ=1.5 (above)        : max( 1.5,  1.2) =  1.5   unclipped
    # A=−2, ρ=0.9 (inside)       : max( 1.8,  1.8) =  1.8   unclipped
    assert torch.allclose(loss, _t(-1.1, -1.2, -0.5, 0.8, 1.5, 1.8), atol=1e-12)
    assert clipped.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def test_clip_higher_by_hand():
    """ε_low 0.2, ε_high 0.28 (DAPO): the ratio is kept in [0.8, 1.28].  By hand, with ratios ρ and advantages A:
        ρ 0.70, A +1: max(−0.70, −0.80) = −0.70             (not clipped)
        ρ 1.25, A +1: max(−1.25, −1.25) = −1.25             (symmetric ε 0.2 would clip to −1.20: no gradient)
        ρ 1.35, A +1: max(−1.35, −1.28) = −1.28             (clipped at 1 + ε_high)
        ρ 0.70, A −1: max(+0.70, +0.80) = +0.80             (clipped at 1 − ε_low, as before)"""
    ratios = torch.tensor([[0.70, 1.25, 1.35, 0.70]])
    old = torch.zeros_like(ratios)
    logprobs = ratios.log().requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    loss, ratio, clipped = clipped_surrogate(logprobs, old, advantages, 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([[-0.70, -1.25, -1.28, 0.80]]))
    assert clipped.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    loss.sum().backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.70, -1.25, 0.0, 0.0]]))  # dL/dlogπ = −A·ρ where unclipped
    symmetric, _, _ = clipped_surrogate(ratios.log(), old, advantages, 0.2)
    assert torch.allclose(symmetric, torch.tensor([[-0.70, -1.20, -1.20, 0.80]]))
    assert torch.equal(clipped_surrogate(ratios.log(), old, advantages, 0.2, None)[0], symmetric)


def test_clip_higher_and_dual_clip_need_a_clipped_objective():
    from rlhf_core.config import params_from_dict
    from rlhf_core.errors import ConfigError

    assert params_from_dict({"ppo": {"clip_range_high": 0.28}}).ppo.clip_range_high == 0.28
    assert params_from_dict({"algorithm": {"name": "rloo"}, "rloo": {"objective": "clipped"},
                             "ppo": {"clip_range_high": 0.28}}).ppo.clip_range_high == 0.28
    assert params_from_dict({"algorithm": {"name": "reinforce_pp"}, "ppo": {"dual_clip": 3.0}}).ppo.dual_clip == 3.0
    for key, value in (("clip_range_high", 0.28), ("dual_clip", 3.0), ("ratio_level", "sequence")):
        for name in ("reinforce", "cispo", "sapo"):
            with pytest.raises(ConfigError, match=f"ppo.{key} = {value!r}: algorithm.name = '{name}' has no clipped"):
                params_from_dict({"algorithm": {"name": name}, "kl": {"reward_coef": 0}, "ppo": {key: value}})


def test_cispo_weights_every_token_by_its_capped_stopped_ratio():
    """ρ = 0.5, 1, 3, 8 with ε_max = 5: weights 0.5, 1, 3, 5 (no lower bound), gradient −w·A on every token, even where
    PPO's clip would have stopped it (ρ = 3 with A > 0; ρ = 0.5 with A < 0)."""
    from rlhf_core.rl.losses import cispo_loss

    ratios = torch.tensor([[0.5, 1.0, 3.0, 8.0]])
    old = torch.full((1, 4), -1.0)
    logprobs = (old + ratios.log()).requires_grad_(True)
    advantages = torch.tensor([[-1.0, 2.0, 1.0, 0.5]])
    loss, ratio, capped = cispo_loss(logprobs, old, advantages, 5.0)
    assert torch.allclose(ratio, ratios)
    assert torch.equal(capped, torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    weights = torch.tensor([[0.5, 1.0, 3.0, 5.0]])
    assert torch.allclose(loss, -weights * advantages * logprobs.detach())
    loss.sum().backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[0.5, -2.0, -3.0, -2.5]]))  # −w·A: nothing is stopped


def test_sapo_gate_by_hand():
    """f(ρ) = (4/τ)σ(τ(ρ − 1)); L = −f(ρ)·A; dL/dlog π = −A·f′(ρ)·ρ with f′(ρ) = 4σ(1 − σ).  At ρ = 1: L = −(2/τ)A and
    the gradient is −A, the policy gradient; far off policy it fades to 0 instead of stopping at an edge."""
    from rlhf_core.rl.losses import sapo_loss

    ratios = torch.tensor([[1.0, 1.0, 2.0, 0.5, 10.0]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -2.0, 1.0]])
    logprobs = ratios.log().requires_grad_(True)
    loss, ratio, gate = sapo_loss(logprobs, torch.zeros(1, 5), advantages, 1.0, 2.0)
    sigma_pos_2 = 1 / (1 + math.exp(-1.0))  # τ = 1, ρ = 2: σ(1)
    sigma_neg_half = 1 / (1 + math.exp(1.0))  # τ = 2, ρ = 0.5: σ(−1)
    sigma_pos_10 = 1 / (1 + math.exp(-9.0))
    expected = [-4 * 0.5, (4 / 2) * 0.5, -4 * sigma_pos_2, (4 / 2) * sigma_neg_half * 2.0, -4 * sigma_pos_10]
    assert torch.allclose(loss, torch.tensor([expected]), atol=1e-6)
    loss.sum().backward()
    gates = [1.0, 1.0, 4 * sigma_pos_2 * (1 - sigma_pos_2), 4 * sigma_neg_half * (1 - sigma_neg_half),
             4 * sigma_pos_10 * (1 - sigma_pos_10)]
    assert torch.allclose(gate, torch.tensor([gates]), atol=1e-6)
    grads = [-a * g * r for a, g, r in zip([1.0, -1.0, 1.0, -2.0, 1.0], gates, [1.0, 1.0, 2.0, 0.5, 10.0])]
    assert torch.allclose(logprobs.grad, torch.tensor([grads]), atol=1e-6)
    assert abs(grads[-1]) < 0.01  # ρ = 10: the gate has all but closed (the policy gradient would be −10)


def test_clipped_surrogate_shapes_and_gradient_zero_when_clipped():
    old = torch.zeros(2, 2)
    logprobs = torch.tensor([[math.log(1.5), 0.0], [0.0, math.log(0.5)]], requires_grad=True)
    advantages = torch.tensor([[1.0, 2.0], [-1.0, -1.0]])
    loss, ratio, clipped = clipped_surrogate(logprobs, old, advantages, 0.2)
    assert loss.shape == ratio.shape == clipped.shape == (2, 2)
    loss.sum().backward()
    # clipped tokens (ρ=1.5, A>0) and (ρ=0.5, A<0) give no gradient; at ρ=1 the gradient is −A·ρ = −A
    assert clipped.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -2.0], [1.0, 0.0]]), atol=1e-6)


def test_clipped_value_loss_by_hand():
    # ε_v = 0.2: V_clip = V_old + clip(V − V_old, −0.2, 0.2); L = ½ max((V − R)², (V_clip − R)²)
    values = _t(1.5, 1.1, 0.5, 0.5)
    old_values = _t(1.0, 1.0, 1.0, 1.0)
    returns = _t(2.0, 0.0, 0.0, 1.0)
    loss, clipped = clipped_value_loss(values, old_values, returns, 0.2)
    # V=1.5, R=2: V_clip=1.2; (−0.5)²=0.25, (−0.8)²=0.64 -> 0.32, clipped
    # V=1.1, R=0: V_clip=1.1; 1.21, 1.21               -> 0.605, not clipped
    # V=0.5, R=0: V_clip=0.8; 0.25, 0.64               -> 0.32, clipped
    # V=0.5, R=1: V_clip=0.8; 0.25, 0.04               -> 0.125, not clipped
    assert torch.allclose(loss, _t(0.32, 0.605, 0.32, 0.125), atol=1e-12)
    assert clipped.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_approx_kl():
    logprobs = _t(-0.5, -1.0, -3.0)
    assert torch.equal(approx_kl(logprobs, logprobs.clone()), torch.zeros(3, dtype=torch.float64))
    # log ρ = log 2: (2 − 1) − log 2 = 0.3069; log ρ = −log 2: (0.5 − 1) + log 2 = 0.1931
    old = _t(-0.5, -1.0)
    new = old + _t(math.log(2.0), -math.log(2.0))
    kl = approx_kl(new, old)
    assert torch.allclose(kl, _t(1.0 - math.log(2.0), math.log(2.0) - 0.5), atol=1e-12)
    assert (kl > 0).all()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    assert (approx_kl(a, b) >= 0).all() and (approx_kl(a, b) > 0).any()


def test_masked_sum():
    values = _t(1.0, 2.0, 4.0)
    assert masked_sum(values, _t(1.0, 0.0, 1.0)).item() == pytest.approx(5.0)


def test_sampler_correction_by_hand():
    """log π_old − log μ per token: [log 3, 0, log 0.25] and [log 0.5, pad].  tis (cap 2): min(w, 2) = 2, 1, 0.25 and 0.5;
    mis [0.5, 2]: 0, 1, 0 and 1; sequence level: one geometric mean per response, (3 · 1 · 0.25)^(1/3) and 0.5."""
    from rlhf_core.rl.losses import sampler_correction

    sampler = torch.zeros(2, 3)
    old = torch.tensor([[math.log(3.0), 0.0, math.log(0.25)], [math.log(0.5), 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kwargs = dict(level="token", cap=2.0, low=0.5, high=2.0)
    weights, capped = sampler_correction(old, sampler, mask, mode="tis", **kwargs)
    assert torch.allclose(weights, torch.tensor([[2.0, 1.0, 0.25], [0.5, 0.0, 0.0]]))
    assert torch.equal(capped, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    kept, dropped = sampler_correction(old, sampler, mask, mode="mis", **kwargs)
    assert torch.equal(kept, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(dropped, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    per_sequence, _ = sampler_correction(old, sampler, mask, mode="tis", **{**kwargs, "level": "sequence"})
    assert torch.allclose(per_sequence, torch.tensor([[0.75 ** (1 / 3)] * 3, [0.5, 0.0, 0.0]]))


def test_truncated_importance_sampling_restores_the_on_policy_gradient_of_a_bandit():
    """Known answer: one-token responses from a 5-armed bandit, π = softmax(θ), rewards r.  The on-policy gradient
    is ∇J = π ⊙ (r − πᵀr).  The tokens are drawn from a perturbed sampler μ = softmax(θ / 2.5) (a different
    temperature).  The plain estimator mean(r ∇log π) then follows E_μ, which would raise arm 4 the most; with TIS
    weights π/μ (cap above every ratio) it follows ∇J, which raises arm 3 the most.  MIS with the band [0.5, 2]
    instead drops the arms whose ratio left the band: the μ-mass of those arms."""
    from rlhf_core.rl.losses import aggregate, policy_gradient_loss, sampler_correction, sampler_mismatch

    theta0 = torch.tensor([0.5, -0.2, 1.0, 0.0, -1.5])
    rewards = torch.tensor([1.0, 0.0, -1.0, 2.0, 3.0])
    pi, mu = torch.softmax(theta0, 0), torch.softmax(theta0 / 2.5, 0)
    exact = pi * (rewards - (pi * rewards).sum())
    generator = torch.Generator().manual_seed(0)
    arms = torch.multinomial(mu, 200_000, replacement=True, generator=generator).unsqueeze(1)  # [N, 1] tokens from μ
    mask = torch.ones(arms.shape)

    def estimate(mode):
        theta = theta0.clone().requires_grad_(True)
        logprobs = torch.log_softmax(theta, 0)[arms]  # [N, 1], the trainer's log π of each token
        advantages = rewards[arms]
        weights = torch.ones_like(mask)
        if mode != "none":
            weights, _ = sampler_correction(logprobs.detach(), mu.log()[arms], mask, mode=mode, level="token",
                                            cap=10.0, low=0.5, high=2.0)
        loss = aggregate(policy_gradient_loss(logprobs, advantages) * weights, mask, "token_mean",
                         total_tokens=float(arms.numel()), total_sequences=float(arms.numel()))
        loss.backward()
        return -theta.grad  # the ascent direction

    assert (pi / mu).max() < 10.0  # the cap never bites: plain importance sampling
    plain, tis = estimate("none"), estimate("tis")
    assert int(exact.argmax()) == 3 and int(tis.argmax()) == 3 and int(plain.argmax()) == 4
    assert (tis - exact).abs().max() < 0.01 and (plain - exact).abs().max() > 0.1
    assert torch.nn.functional.cosine_similarity(tis, exact, dim=0) > 0.999
    _, dropped = sampler_correction(torch.log_softmax(theta0, 0)[arms], mu.log()[arms], mask, mode="mis",
                                    level="token", cap=2.0, low=0.5, high=2.0)
    outside = ((pi / mu) < 0.5) | ((pi / mu) > 2.0)
    assert float(dropped.mean()) == pytest.approx(float(mu[outside].sum()), abs=0.005)
    mismatch = sampler_mismatch(torch.log_softmax(theta0, 0)[arms], mu.log()[arms], mask)
    ratio = pi / mu
    assert mismatch["kl"] == pytest.approx(float((mu * (ratio - 1 - ratio.log())).sum()), abs=0.005)  # KL(μ‖π)
    assert mismatch["max_abs_logprob_diff"] == pytest.approx(float(ratio.log().abs().max()), abs=1e-5)
