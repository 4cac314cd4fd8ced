"""Hand-worked values for the critic-free advantage estimators and the extra PPO loss options."""

import math

import pytest
import torch

from rlhf_core.rl.advantages import group_normalize, leave_one_out_baseline, reward_to_go, round_advantages
from rlhf_core.rl.losses import aggregate, dual_clip, policy_gradient_loss, sequence_log_ratio


def test_reward_to_go_by_hand():
    # rewards [1, 0, 2] and [3, pad]; γ = 0.5
    # row 0: G2 = 2, G1 = 0 + 0.5·2 = 1, G0 = 1 + 0.5·1 = 1.5;  row 1: G0 = 3
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert reward_to_go(rewards, mask, 0.5).tolist() == [[1.5, 1.0, 2.0], [3.0, 0.0, 0.0]]


def test_leave_one_out_baseline_by_hand():
    # group 7: [1, 2, 6] → baselines [(2+6)/2, (1+6)/2, (1+2)/2] = [4, 3.5, 1.5]; group 9: [5, 1] → [1, 5]
    values = torch.tensor([1.0, 5.0, 2.0, 6.0, 1.0])
    groups = torch.tensor([7, 9, 7, 7, 9])
    assert leave_one_out_baseline(values, groups).tolist() == [4.0, 1.0, 3.5, 1.5, 5.0]
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_baseline(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_group_normalize_by_hand():
    # group a: [1, 3] → mean 2, unbiased std √2 → ±1/√2; group b: [0, 0, 3] → mean 1, std √3 → [−1/√3, −1/√3, 2/√3]
    scores = torch.tensor([1.0, 0.0, 3.0, 0.0, 3.0])
    groups = torch.tensor([0, 1, 0, 1, 1])
    scaled = group_normalize(scores, groups, scale_by_std=True, eps=0.0)
    expected = [-1 / math.sqrt(2), -1 / math.sqrt(3), 1 / math.sqrt(2), -1 / math.sqrt(3), 2 / math.sqrt(3)]
    assert scaled.tolist() == pytest.approx(expected, abs=1e-6)
    # Dr. GRPO: no std
    assert group_normalize(scores, groups, scale_by_std=False, eps=1e-6).tolist() == [-1.0, -1.0, 1.0, -1.0, 2.0]
    # a group whose samples all score the same gets 0, not NaN
    same = group_normalize(torch.tensor([2.0, 2.0]), torch.tensor([0, 0]), scale_by_std=True, eps=1e-6)
    assert same.tolist() == [0.0, 0.0]


def _round(estimator, **kwargs):
    logprobs = [[-1.0, -1.0], [-1.0], [-1.0, -1.0, -1.0], [-1.0]]
    return round_advantages(logprobs, logprobs, [[0.0] * len(x) for x in logprobs], [1.0, 0.0, 3.0, 2.0],
                            kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=1.0, whiten_rewards=False,
                            whiten_advantages=False, estimator=estimator, group_ids=[0, 0, 1, 1], **kwargs)


def test_round_estimators_by_hand():
    # KL is 0 (logprobs == ref), so the sequence returns are the scores [1, 0, 3, 2].
    arrays, _ = _round("leave_one_out")  # R_i − R_other: [1−0, 0−1, 3−2, 2−3] on every token
    assert [a.tolist() for a in arrays["advantages"]] == [[1.0, 1.0], [-1.0], [1.0, 1.0, 1.0], [-1.0]]
    arrays, _ = _round("group", scale_by_std=False)  # s − group mean: [0.5, −0.5, 0.5, −0.5]
    assert [a.tolist() for a in arrays["advantages"]] == [[0.5, 0.5], [-0.5], [0.5, 0.5, 0.5], [-0.5]]
    arrays, _ = _round("return", baseline="moving_average", moving_baseline=0.5)  # G − 0.5
    assert [a.tolist() for a in arrays["advantages"]] == [[0.5, 0.5], [-0.5], [2.5, 2.5, 2.5], [1.5]]
    arrays, _ = _round("return", baseline="none")
    assert [a.tolist() for a in arrays["advantages"]] == [[1.0, 1.0], [0.0], [3.0, 3.0, 3.0], [2.0]]


def test_grpo_puts_no_kl_in_the_reward_but_rloo_does():
    logprobs, ref = [[-1.0, -2.0], [-1.0]], [[-1.5, -2.0], [-1.0]]  # row 0: k1 = 0.5 at token 0
    common = dict(kl_coef=0.2, kl_estimator="k1", gamma=1.0, lam=1.0, whiten_rewards=False, whiten_advantages=False,
                  group_ids=[0, 0])
    values = [[0.0, 0.0], [0.0]]
    grpo, grpo_metrics = round_advantages(logprobs, ref, values, [1.0, 1.0], estimator="group", **common)
    assert grpo_metrics["kl_coef"] == 0.0 and [a.tolist() for a in grpo["advantages"]] == [[0.0, 0.0], [0.0]]
    rloo, _ = round_advantages(logprobs, ref, values, [1.0, 1.0], estimator="leave_one_out", **common)
    # sequence rewards: 1 − 0.2·0.5 = 0.9 and 1 → advantages −0.1 and +0.1
    assert rloo["advantages"][0].tolist() == pytest.approx([-0.1, -0.1], abs=1e-6)
    assert rloo["advantages"][1].tolist() == pytest.approx([0.1], abs=1e-6)


def test_dual_clip_bounds_negative_advantage_losses():
    loss = torch.tensor([[5.0, 5.0, 0.5]])
    advantages = torch.tensor([[-1.0, 1.0, -1.0]])
    # A < 0: min(L, −c·A) = min(5, 3) = 3; A > 0 untouched; small losses untouched
    assert dual_clip(loss, advantages, 3.0).tolist() == [[3.0, 5.0, 0.5]]
    assert dual_clip(loss, advantages, None) is loss


def test_sequence_ratio_is_the_mean_token_log_ratio():
    new = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    old = torch.tensor([[-1.5, -1.5, 9.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # row 0: (0.5 − 0.5) / 2 = 0; row 1: 2 / 1 = 2 (padding ignored)
    assert sequence_log_ratio(new, old, mask).tolist() == [[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]


def test_policy_gradient_loss_and_aggregations_by_hand():
    assert policy_gradient_loss(torch.tensor([[-2.0]]), torch.tensor([[0.5]])).item() == 1.0
    loss = torch.tensor([[1.0, 3.0], [4.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # token mean: (1+3+4)/3 tokens; seq-mean of token-means: (2 + 4)/2; seq-mean of token-sums: (4 + 4)/2
    assert aggregate(loss, mask, "token_mean", total_tokens=3, total_sequences=2).item() == pytest.approx(8 / 3)
    assert aggregate(loss, mask, "seq_mean_token_mean", total_tokens=3, total_sequences=2).item() == 3.0
    assert aggregate(loss, mask, "seq_mean_token_sum", total_tokens=3, total_sequences=2).item() == 4.0


def test_the_registry_names_only_estimators_and_objectives_that_exist():
    """The registry is torch-free, so it names the estimators and objectives that advantages.ESTIMATORS and
    ppo.OBJECTIVES implement: every name it lists, and every built-in algorithm's (under each variant), has its
    function; registering an unknown estimator or critic is refused."""
    import dataclasses

    from rlhf_core.config import params_from_dict
    from rlhf_core.rl.advantages import ESTIMATORS
    from rlhf_core.rl.algorithms import registry
    from rlhf_core.rl.algorithms.ppo import OBJECTIVES

    assert set(registry.ESTIMATORS) == set(ESTIMATORS)
    variants = [{}, {"reinforce": {"baseline": "value"}}, {"reinforce": {"baseline": "leave_one_out"}},
                {"rloo": {"objective": "clipped"}}, {"reinforce_pp": {"baseline": "group_mean"}}]
    for name, algorithm in registry.ALGORITHMS.items():
        for variant in variants:
            raw = {"algorithm": {"name": name}, **{k: v for k, v in variant.items() if k == name}}
            traits = algorithm.traits_for(params_from_dict(raw))
            assert traits.estimator in ESTIMATORS, name
            assert traits.objective in (*registry.UPDATE_LOOPS, *OBJECTIVES), name
    with pytest.raises(ValueError, match="estimator 'vtrace' must be one of"):
        registry.register(dataclasses.replace(registry.get("ppo"), name="x",
                                              traits=dataclasses.replace(registry.get("ppo").traits, estimator="vtrace")))
    assert "x" not in registry.ALGORITHMS
