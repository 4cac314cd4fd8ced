"""Unit tests of rlhf_core.rl.advantages: token rewards, GAE, whitening and the round's advantages step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhf_core.rl.advantages import (
    explained_variance,
    gae,
    masked_mean,
    masked_var,
    masked_whiten,
    pad_sequences,
    round_advantages,
    token_rewards,
)

GAMMA, LAM = 0.9, 0.8


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_one_row_three_tokens_by_hand():
    rewards = _t([[1.0, 0.5, 2.0]])
    values = _t([[0.5, 1.0, 1.5]])
    mask = _t([[1.0, 1.0, 1.0]])
    # γ = 0.9, λ = 0.8, γλ = 0.72, V(s_3) = 0 after the last token
    # δ_2 = r_2 + γ·0   − V_2 = 2.0 − 1.5              = 0.5
    # δ_1 = r_1 + γ·V_2 − V_1 = 0.5 + 0.9·1.5 − 1.0    = 0.85
    # δ_0 = r_0 + γ·V_1 − V_0 = 1.0 + 0.9·1.0 − 0.5    = 1.4
    # A_2 = δ_2                   = 0.5
    # A_1 = δ_1 + γλ·A_2 = 0.85 + 0.72·0.5  = 1.21
    # A_0 = δ_0 + γλ·A_1 = 1.4  + 0.72·1.21 = 2.2712
    # R_t = A_t + V_t = [2.7712, 2.21, 2.0]
    advantages, returns = gae(rewards, values, mask, GAMMA, LAM)
    assert torch.allclose(advantages, _t([[2.2712, 1.21, 0.5]]), atol=1e-12)
    assert torch.allclose(returns, _t([[2.7712, 2.21, 2.0]]), atol=1e-12)


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    rewards = _t([[1.0, 0.5, 2.0]])
    values = _t([[0.5, 1.0, 1.5]])
    advantages, returns = gae(rewards, values, torch.ones_like(rewards), 1.0, 1.0)
    # with γ = λ = 1: A_t = Σ_{l≥t} r_l − V_t, R_t = Σ_{l≥t} r_l
    assert torch.allclose(returns, _t([[3.5, 2.5, 2.0]]), atol=1e-12)
    assert torch.allclose(advantages, _t([[3.0, 1.5, 0.5]]), atol=1e-12)


def test_gae_padding_matches_unpadded_rows():
    gen = torch.Generator().manual_seed(0)
    long_r, long_v = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    short_r, short_v = torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    # garbage on the padded positions must not leak into the real ones
    rewards = torch.stack([long_r, torch.cat([short_r, _t([7.0, -9.0])])])
    values = torch.stack([long_v, torch.cat([short_v, _t([3.0, 11.0])])])
    mask = _t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, GAMMA, LAM)

    for row, (r, v) in enumerate([(long_r, long_v), (short_r, short_v)]):
        a1, ret1 = gae(r[None], v[None], torch.ones(1, len(r), dtype=torch.float64), GAMMA, LAM)
        n = len(r)
        assert torch.allclose(advantages[row, :n], a1[0], atol=1e-12)
        assert torch.allclose(returns[row, :n], ret1[0], atol=1e-12)
    assert torch.equal(advantages[1, 3:], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(returns[1, 3:], torch.zeros(2, dtype=torch.float64))


def test_token_rewards_score_on_last_real_token_and_kl_penalty_everywhere():
    scores = _t([1.0, -2.0])
    kl = _t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.9]])  # 0.9 sits on padding
    mask = _t([[1, 1, 1], [1, 1, 0]])
    rewards = token_rewards(scores, kl, mask, kl_coef=0.5)
    # row 0: −0.5·[0.1, 0.2, 0.3] + [0, 0, 1]  = [−0.05, −0.1, 0.85]
    # row 1: −0.5·[0.4, 0.5, ·]   + [0, −2, ·] = [−0.2, −2.25, 0]
    assert torch.allclose(rewards, _t([[-0.05, -0.1, 0.85], [-0.2, -2.25, 0.0]]), atol=1e-12)


def test_token_rewards_zero_kl_coef_gives_only_the_score():
    scores = _t([0.7, 0.3])
    kl = _t([[5.0, 5.0], [5.0, 5.0]])
    mask = _t([[1, 0], [1, 1]])
    rewards = token_rewards(scores, kl, mask, kl_coef=0.0)
    assert torch.allclose(rewards, _t([[0.7, 0.0], [0.0, 0.3]]), atol=1e-12)


def test_masked_mean_and_var():
    values = _t([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.5)
    # unbiased: ((1.5² + 0.5² + 0.5² + 1.5²) / 3) = 5/3
    assert masked_var(values, mask).item() == pytest.approx(5.0 / 3.0)
    assert torch.allclose(masked_mean(values, mask, dim=1), _t([2.0, 4.0]))


def test_masked_whiten_mean_zero_var_one_and_zero_on_padding():
    values = _t([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    white = masked_whiten(values, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(white, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(white[1, 1:], torch.zeros(2, dtype=torch.float64))
    # (x − 2.5) / sqrt(5/3)
    scale = math.sqrt(5.0 / 3.0)
    assert torch.allclose(white[0], _t([-1.5, -0.5, 0.5]) / scale, atol=1e-6)


def test_masked_whiten_without_shift_keeps_the_mean():
    values = _t([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    white = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(white, mask).item() == pytest.approx(2.5, abs=1e-9)
    assert masked_var(white, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(white[1, 1:], torch.zeros(2, dtype=torch.float64))


def test_explained_variance():
    targets = _t([[1.0, 2.0, 3.0], [4.0, 50.0, 0.0]])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    assert explained_variance(targets.clone(), targets, mask) == pytest.approx(1.0)
    # var(target) = 5/3; residual [0, 0, 0, −1] has unbiased var 0.25 -> 1 − 0.25/(5/3) = 0.85
    predictions = _t([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    assert explained_variance(predictions, targets, mask) == pytest.approx(0.85)
    # a constant target has no variance to explain
    constant = _t([[2.0, 2.0, 2.0], [2.0, 9.0, 9.0]])
    assert explained_variance(predictions, constant, mask) == 0.0


def test_pad_sequences():
    values, mask = pad_sequences([[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]])
    assert values.tolist() == [[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [4.0, 5.0, 6.0]]
    assert mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]


def _ragged_inputs():
    logprobs = [np.array([-1.0, -2.0, -0.5]), np.array([-0.3]), np.array([-1.5, -0.2])]
    ref = [np.array([-1.2, -1.0, -0.5]), np.array([-0.1]), np.array([-1.0, -0.7])]
    values = [np.array([0.1, 0.2, 0.3]), np.array([-0.4]), np.array([0.5, 0.0])]
    scores = [1.0, -0.5, 0.25]
    return logprobs, ref, values, scores


def test_round_advantages_without_whitening_matches_hand_pieces():
    logprobs, ref, values, scores = _ragged_inputs()
    out, metrics = round_advantages(logprobs, ref, values, scores, kl_coef=0.1, kl_estimator="k1", gamma=1.0,
                                    lam=1.0, whiten_rewards=False, whiten_advantages=False)
    assert set(out) == {"kl", "rewards", "advantages", "returns"}
    for name in out:
        assert [len(a) for a in out[name]] == [3, 1, 2]
        assert all(a.dtype == np.float32 for a in out[name])
    # k1 per token
    np.testing.assert_allclose(out["kl"][0], [0.2, -1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out["kl"][1], [-0.2], atol=1e-6)
    np.testing.assert_allclose(out["kl"][2], [-0.5, 0.5], atol=1e-6)
    # rewards = −0.1·kl, plus the score on the last token
    np.testing.assert_allclose(out["rewards"][0], [-0.02, 0.1, 1.0], atol=1e-6)
    np.testing.assert_allclose(out["rewards"][1], [0.02 - 0.5], atol=1e-6)
    np.testing.assert_allclose(out["rewards"][2], [0.05, -0.05 + 0.25], atol=1e-6)
    # γ = λ = 1: returns are rewards-to-go, advantages = returns − values
    np.testing.assert_allclose(out["returns"][0], [1.08, 1.1, 1.0], atol=1e-6)
    np.testing.assert_allclose(out["advantages"][0], [0.98, 0.9, 0.7], atol=1e-6)
    np.testing.assert_allclose(out["returns"][2], [0.25, 0.2], atol=1e-6)
    np.testing.assert_allclose(out["advantages"][2], [-0.25, 0.2], atol=1e-6)

    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["kl_coef"] == pytest.approx(0.1)
    # sequence KLs: −0.8, −0.2, 0.0 -> mean −1/3
    assert metrics["kl_sequence_mean"] == pytest.approx(-1.0 / 3.0, abs=1e-6)
    assert metrics["kl_k1_sequence_mean"] == pytest.approx(-1.0 / 3.0, abs=1e-6)
    assert metrics["non_score_reward_mean"] == pytest.approx(0.1 / 3.0, abs=1e-6)
    assert metrics["score_mean"] == pytest.approx(0.25)
    assert metrics["score_std"] == pytest.approx(float(np.std(scores)), abs=1e-6)
    assert metrics["value_mean"] == pytest.approx(0.7 / 6.0, abs=1e-6)


def test_round_advantages_k3_estimator():
    logprobs, ref, values, scores = _ragged_inputs()
    out, metrics = round_advantages(logprobs, ref, values, scores, kl_coef=0.1, kl_estimator="k3", gamma=1.0,
                                    lam=0.95, whiten_rewards=False, whiten_advantages=False)
    for lp, rf, kl in zip(logprobs, ref, out["kl"]):
        log_r = rf - lp
        np.testing.assert_allclose(kl, np.expm1(log_r) - log_r, atol=1e-6)
        assert (kl >= 0).all()
    # the k1 metric is reported whatever the estimator
    assert metrics["kl_k1_sequence_mean"] == pytest.approx(-1.0 / 3.0, abs=1e-6)


def test_round_advantages_with_whitening():
    logprobs, ref, values, scores = _ragged_inputs()
    out, metrics = round_advantages(logprobs, ref, values, scores, kl_coef=0.05, kl_estimator="k1", gamma=0.9,
                                    lam=0.95, whiten_rewards=True, whiten_advantages=True)
    assert [len(a) for a in out["advantages"]] == [3, 1, 2]
    flat = np.concatenate(out["advantages"]).astype(np.float64)
    assert flat.mean() == pytest.approx(0.0, abs=1e-6)
    assert flat.var(ddof=1) == pytest.approx(1.0, abs=1e-5)
    assert metrics["advantage_mean"] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(v) for v in metrics.values())
    assert set(metrics) >= {"kl_coef", "kl_sequence_mean", "score_mean", "advantage_mean", "return_mean",
                            "value_mean", "value_explained_variance"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_round_advantages_raises_on_non_finite_score(bad):
    logprobs, ref, values, scores = _ragged_inputs()
    scores[1] = bad
    with pytest.raises(FloatingPointError, match="response 1"):
        round_advantages(logprobs, ref, values, scores, kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=0.95,
                         whiten_rewards=False, whiten_advantages=True)


def test_round_advantages_kl_free_has_no_kl_and_the_same_advantages():
    """ref_logprobs None (the KL-free mode): the advantages of β = 0 with a reference, and no KL metrics."""
    logprobs, ref, values, scores = _ragged_inputs()
    with_ref, with_ref_metrics = round_advantages(logprobs, ref, values, scores, kl_coef=0.0, kl_estimator="k1",
                                                  gamma=1.0, lam=0.95, whiten_rewards=False, whiten_advantages=True)
    kl_free, metrics = round_advantages(logprobs, None, values, scores, kl_coef=0.0, kl_estimator="k1", gamma=1.0,
                                        lam=0.95, whiten_rewards=False, whiten_advantages=True)
    for name in ("rewards", "advantages", "returns"):
        for a, b in zip(with_ref[name], kl_free[name]):
            np.testing.assert_array_equal(a, b)
    assert "kl_sequence_mean" in with_ref_metrics
    assert not {"kl_sequence_mean", "kl_k1_sequence_mean"} & set(metrics)
    with pytest.raises(ValueError, match="needs the reference"):
        round_advantages(logprobs, None, values, scores, kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=0.95,
                         whiten_rewards=False, whiten_advantages=True)


def test_trained_responses_leave_out_the_truncated_only_when_asked():
    from rlhf_core.rl.advantages import trained_responses

    ended = [True, False, True, False]
    assert trained_responses(ended, mask_truncated=False) == ([True] * 4, {"trained_fraction": 1.0, "masked_truncated": 0})
    assert trained_responses(ended, mask_truncated=True) == (ended, {"trained_fraction": 0.5, "masked_truncated": 2})


def test_reinforce_pp_advantages_by_hand():
    """REINFORCE++: r_t = −β·kl_t + score on the last token, G_t its reward-to-go, A = whiten(G) over every token of the
    batch; -baseline subtracts each prompt's mean score first."""
    logprobs = [np.array([-1.0, -1.0], dtype=np.float32), np.array([-1.0], dtype=np.float32),
                np.array([-1.0], dtype=np.float32)]
    ref = [np.array([-1.5, -1.0], dtype=np.float32), np.array([-1.0], dtype=np.float32),
           np.array([-1.0], dtype=np.float32)]
    values = [np.zeros(2, dtype=np.float32), np.zeros(1, dtype=np.float32), np.zeros(1, dtype=np.float32)]
    scores = [1.0, 0.0, 2.0]
    out, _ = round_advantages(logprobs, ref, values, scores, kl_coef=0.2, kl_estimator="k1", gamma=1.0, lam=1.0,
                              whiten_rewards=False, whiten_advantages=False, estimator="batch_rtg",
                              group_ids=[0, 0, 1])
    # kl = [0.5, 0], [0], [0]: rewards [−0.1, 1], [0], [2]; reward-to-go [0.9, 1], [0], [2]
    to_go = np.array([0.9, 1.0, 0.0, 2.0])
    whitened = (to_go - to_go.mean()) / np.sqrt(to_go.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(np.concatenate(out["advantages"]), whitened, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(out["returns"]), to_go, atol=1e-6)
    centred, _ = round_advantages(logprobs, ref, values, scores, kl_coef=0.2, kl_estimator="k1", gamma=1.0, lam=1.0,
                                  whiten_rewards=False, whiten_advantages=False, estimator="batch_rtg",
                                  group_ids=[0, 0, 1], group_baseline=True)
    # scores minus their prompt's mean: 0.5, −0.5, 0 → rewards [−0.1, 0.5], [−0.5], [0]; to-go [0.4, 0.5], [−0.5], [0]
    to_go = np.array([0.4, 0.5, -0.5, 0.0])
    whitened = (to_go - to_go.mean()) / np.sqrt(to_go.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(np.concatenate(centred["advantages"]), whitened, atol=1e-5)


def test_dynamic_sampling_drops_uniform_groups_and_keeps_a_seeded_choice_of_the_rest():
    """Groups 0 and 2 score all alike (dropped); of the informative 1, 3 and 4, two are kept, chosen by the seed."""
    from rlhf_core.rl.advantages import dynamic_sampling

    scores = [[1.0], [1.0], [0.0], [1.0], [0.5], [0.5], [0.2], [0.3], [0.0], [1.0]]
    groups = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    kept, metrics = dynamic_sampling(scores, groups, keep=2, seed=0)
    kept_groups = {g for g, k in zip(groups, kept) if k}
    assert len(kept_groups) == 2 and kept_groups <= {1, 3, 4}
    assert all(kept[i] == kept[i + 1] for i in range(0, 10, 2))  # a group is kept whole
    assert metrics == {"groups": 5, "groups_uniform": 2, "groups_surplus": 1, "groups_kept": 2, "groups_shortfall": 0}
    choices = {frozenset(g for g, k in zip(groups, dynamic_sampling(scores, groups, keep=2, seed=seed)[0]) if k)
               for seed in range(20)}
    assert len(choices) == 3  # every pair of the three informative groups, depending on the seed
    everything, short = dynamic_sampling(scores, groups, keep=5, seed=0)
    assert {g for g, k in zip(groups, everything) if k} == {1, 3, 4} and short["groups_shortfall"] == 2


def test_gdpo_normalises_each_component_within_its_group_then_the_sum_over_the_batch():
    """Two groups of two; c1 is a 0/1 correctness, c2 a small length term, weights 1 and 1.
    c1: group 0 [1, 0] → [+1/√2, −1/√2]; group 1 [1, 1] → [0, 0].  c2: group 0 [0.1, 0.3] → [−1/√2, +1/√2];
    group 1 [0.2, 0.0] → [+1/√2, −1/√2].  Sums [0, 0, 1/√2, −1/√2]; over the batch (std √(1/3)): [0, 0, ±√1.5].
    GRPO on the total (1.1, 0.3 | 1.2, 1.0) instead gives ±1/√2 in both groups: the small length term is drowned."""
    from rlhf_core.rl.advantages import gdpo_advantages, group_normalize

    components = torch.tensor([[1.0, 0.1], [0.0, 0.3], [1.0, 0.2], [1.0, 0.0]])
    groups = torch.tensor([0, 0, 1, 1])
    gdpo = gdpo_advantages(components, [1.0, 1.0], groups, scale_by_std=True, eps=1e-6)
    assert torch.allclose(gdpo, torch.tensor([0.0, 0.0, 1.5 ** 0.5, -(1.5 ** 0.5)]), atol=1e-4)
    grpo = group_normalize(components.sum(1), groups, scale_by_std=True, eps=1e-6)
    assert torch.allclose(grpo, torch.tensor([1, -1, 1, -1]) / 2 ** 0.5, atol=1e-4)
    logprobs = [np.zeros(2, dtype=np.float32)] * 4
    out, _ = round_advantages(logprobs, logprobs, logprobs, components.sum(1).tolist(), kl_coef=0.0, kl_estimator="k1",
                              gamma=1.0, lam=1.0, whiten_rewards=False, whiten_advantages=False, estimator="group",
                              group_ids=[0, 0, 1, 1], components=components.tolist(), component_weights=[1.0, 1.0])
    np.testing.assert_allclose([a[0] for a in out["advantages"]], gdpo.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["advantages"][2], [1.5 ** 0.5] * 2, atol=1e-4)  # every token of the response


def test_dynamic_sampling_keeps_a_group_whose_components_differ_though_its_totals_tie():
    """GDPO: (1, 0) and (0, 1) with weights 1, 1 both total 1, yet their component advantages differ."""
    from rlhf_core.rl.advantages import dynamic_sampling

    kept, metrics = dynamic_sampling([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]], [0, 0, 1, 1], keep=2, seed=0)
    assert kept == [True, True, False, False] and metrics["groups_uniform"] == 1


def _round_tables(scores, with_reference: bool, ended=None):
    """rollouts and scores DataFrames of 2-token responses, two samples per prompt (prompt_index = row // 2)."""
    import numpy as np
    import pandas as pd

    rows = len(scores)
    rollouts = pd.DataFrame({"prompt_index": [row // 2 for row in range(rows)],
                             "logprobs": [np.array([-1.0, -0.5], dtype=np.float32)] * rows,
                             "values": [np.zeros(2, dtype=np.float32)] * rows,
                             "ended_with_eos": ended or [True] * rows})
    if with_reference:
        rollouts["ref_logprobs"] = [np.array([-1.5, -0.5], dtype=np.float32)] * rows
    return rollouts, pd.DataFrame({"total": scores})


def test_the_round_without_a_stage_kl_free():
    """advantages_of_round, the advantages stage's core, on tables in memory: grpo's auto coefficients are 0 (KL-free),
    so there is no ref_logprobs column to read, no KL metric, and β stays 0 for the next round."""
    from rlhf_core.config import params_from_dict
    from rlhf_core.rl.advantages import advantages_of_round

    params = params_from_dict({"algorithm": {"name": "grpo"}})
    assert not params.uses_reference
    rollouts, scores = _round_tables([1.0, 0.0, 0.5, 0.5], with_reference=False)
    arrays, metrics, state = advantages_of_round(params, rollouts, scores, carried={}, seed=0)
    assert "kl_sequence_mean" not in metrics and metrics["kl_coef"] == 0.0 and state["kl_coef"] == 0.0
    # group-normalised: (s − mean) / (std + ε) per prompt; the second prompt's scores are equal: 0
    assert [float(a[0]) for a in arrays["advantages"]] == pytest.approx([0.7071, -0.7071, 0.0, 0.0], abs=1e-4)
    assert arrays["trained"] == [True] * 4 and metrics["estimator"] == "group"


def test_the_round_without_a_stage_dynamic_sampling_and_the_carried_kl():
    """Dynamic sampling drops the prompt whose samples scored alike (its rows untrained, zero advantages); with the
    KL in the reward (rloo), the adaptive controller starts from the β carried in the start checkpoint."""
    from rlhf_core.config import params_from_dict
    from rlhf_core.rl.advantages import advantages_of_round

    params = params_from_dict({"algorithm": {"name": "rloo"}, "rollout": {"prompts_per_round": 2, "oversample": 1.5},
                               "advantages": {"dynamic_sampling": True}, "kl": {"adaptive": True}})
    rollouts, scores = _round_tables([1.0, 0.0, 0.5, 0.5, 0.0, 1.0], with_reference=True)
    arrays, metrics, state = advantages_of_round(params, rollouts, scores, carried={"kl_coef": 0.2}, seed=0)
    assert arrays["trained"] == [True, True, False, False, True, True]
    assert all(float(abs(a).sum()) == 0.0 for a in arrays["advantages"][2:4])
    assert (metrics["groups_uniform"], metrics["groups_kept"], metrics["kl_coef"]) == (1, 2, 0.2)
    assert state["kl_coef"] != 0.2  # the controller moved β from the carried value
    # rloo: R_i − the other sample's R, on every token, with R = score − 0.2·Σ k1 (k1 = 0.5 on the first token)
    assert float(arrays["advantages"][0][0]) == pytest.approx(1.0, abs=1e-6)
