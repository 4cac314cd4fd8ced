"""Token-level rewards, GAE and whitening.  Imports only torch.

All tensors are right-padded [B, T] with a float ``mask`` [B, T] that is 1 on real response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Σ mask·x / Σ mask (over ``dim``, or everything)."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries: Σ mask·(x − μ)² / (Σ mask − 1)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    return ((values - mean) ** 2 * mask).sum() / (count - 1).clamp(min=1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − μ) / sqrt(σ² + eps) over the masked entries; with shift_mean=False the mean is added back.

    Padded positions are returned as 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = −β·kl_t at every response token, plus the sequence score on the last response token.

    scores: [B]; kl, mask: [B, T] -> rewards [B, T] (0 on padding).
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) on right-padded sequences:

        δ_t = r_t + γ·V(s_{t+1}) − V(s_t),     with V(s_T) = 0 after the last response token
        A_t = δ_t + γλ·A_{t+1}                  (= Σ_l (γλ)^l δ_{t+l})
        R_t = A_t + V(s_t)                      (the value target)

    rewards, values, mask: [B, T] -> (advantages [B, T], returns [B, T]), 0 on padding.
    """
    batch, steps = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(steps)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # On padding, carry nothing backwards: the next real token sees V = 0 and A = 0 after it.
        next_advantage = advantage * m
        next_value = values[:, t] * m
    returns = (advantages + values) * mask
    return advantages, returns


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[target − prediction] / Var[target] over masked entries (1 is perfect, ≤ 0 is useless)."""
    var_target = masked_var(targets, mask)
    if var_target.item() == 0.0:
        return 0.0
    return float(1.0 - masked_var(targets - predictions, mask) / var_target)


def pad_sequences(sequences, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of 1-D arrays into [B, T] values and a [B, T] float mask."""
    width = max(1, max(len(s) for s in sequences))
    values = torch.zeros((len(sequences), width), dtype=dtype)
    mask = torch.zeros((len(sequences), width), dtype=torch.float32)
    for row, sequence in enumerate(sequences):
        values[row, :len(sequence)] = torch.tensor(list(sequence), dtype=dtype)
        mask[row, :len(sequence)] = 1.0
    return values, mask


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = Σ_{t' ≥ t} γ^{t'−t} r_t' on right-padded sequences.  [B, T] -> [B, T], 0 on padding."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def leave_one_out_baseline(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """b_i = (Σ_{j ∈ g(i)} v_j − v_i) / (n_g − 1): the mean of the *other* samples of i's group.  [B] -> [B].

    Every group needs at least 2 members.
    """
    groups, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError("leave-one-out needs at least 2 samples per prompt")
    sums = torch.zeros(len(groups), dtype=values.dtype).index_add_(0, inverse, values)
    return (sums[inverse] - values) / (counts[inverse] - 1).to(values.dtype)


def group_normalize(scores: torch.Tensor, group_ids: torch.Tensor, scale_by_std: bool, eps: float) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024): Â_i = (r_i − mean_g(r)) / (std_g(r) + ε), std unbiased.

    With scale_by_std=False (Dr. GRPO, Liu et al. 2025): Â_i = r_i − mean_g(r).  [B] -> [B].
    """
    groups, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(groups), dtype=scores.dtype).index_add_(0, inverse, scores)
    means = sums / counts.to(scores.dtype)
    centred = scores - means[inverse]
    if not scale_by_std:
        return centred
    squares = torch.zeros(len(groups), dtype=scores.dtype).index_add_(0, inverse, centred ** 2)
    std = (squares / (counts - 1).clamp(min=1).to(scores.dtype)).sqrt()
    return centred / (std[inverse] + eps)


def trained_responses(ended_with_eos, *, mask_truncated: bool, sampled=None) -> tuple[list[bool], dict]:
    """Which responses the update trains on: those of the groups dynamic sampling kept (``sampled``; None: all),
    less, with mask_truncated, the truncated ones.

    mask_truncated (DAPO's overlong filtering, Yu et al. 2025; TRL's mask_truncated_completions): a response cut off
    at max_new_tokens without EOS is left out of the loss, since its unfinished text was scored as if it were an
    answer; it still counts in the group baselines and the whitening.  [B] bools -> ([B] bools, metrics).
    """
    sampled = [True] * len(ended_with_eos) if sampled is None else [bool(value) for value in sampled]
    truncated = [kept and not ended for kept, ended in zip(sampled, ended_with_eos)]
    trained = [kept and not (mask_truncated and cut) for kept, cut in zip(sampled, truncated)]
    return trained, {"trained_fraction": sum(trained) / max(1, len(trained)),
                     "masked_truncated": sum(truncated) if mask_truncated else 0}


def expand_rows(arrays: dict[str, list], rows: list[int], lengths: list[int]) -> dict[str, list]:
    """Per-response arrays computed on ``rows`` of a round (dynamic sampling's kept groups), back on every row of it:
    a row not computed gets float32 zeros of its length (``lengths``: every row's response length)."""
    import numpy as np

    expanded = {}
    for name, values in arrays.items():
        full = [np.zeros(length, dtype=np.float32) for length in lengths]
        for row, value in zip(rows, values):
            full[row] = value
        expanded[name] = full
    return expanded


def policy_tokens(arrays: list, policy_masks: list) -> list:
    """Each response's values at its policy tokens only (multi-turn episodes): [T_i] with a 0/1 mask [T_i] ->
    [P_i], P_i = Σ mask.  Run on these, the token MDP is the policy's own turns: GAE's V(s_{t+1}) is the value at the
    next policy token, so it skips the environment's tokens instead of bootstrapping through them, and the score
    lands on the last policy token."""
    import numpy as np

    return [np.asarray(array)[np.asarray(mask, dtype=bool)] for array, mask in zip(arrays, policy_masks, strict=True)]


def spread_policy_tokens(arrays: list, policy_masks: list) -> list:
    """The inverse of ``policy_tokens``: [P_i] back to float32 [T_i], 0 at the environment's tokens."""
    import numpy as np

    spread = []
    for array, mask in zip(arrays, policy_masks, strict=True):
        keep = np.asarray(mask, dtype=bool)
        full = np.zeros(len(keep), dtype=np.float32)
        full[keep] = array
        spread.append(full)
    return spread


def dynamic_sampling(rewards, group_ids, *, keep: int, seed: int, tolerance: float = 1e-8) -> tuple[list[bool], dict]:
    """DAPO's dynamic sampling (Yu et al. 2025): a prompt group whose rewards are all equal (every reward component:
    max − min ≤ tolerance within the group) has a zero group-relative advantage from the reward, so it adds no
    signal, only dilution, and is dropped; of the informative groups, ``keep`` are kept, taken in a seeded random
    order (not by prompt index, which would favour some prompts round after round).  The rollout over-samples the
    groups (rollout.oversample) so that dropped groups are refilled.

    rewards: [B, K] (the total as K = 1, or GDPO's K components); group_ids: [B] -> ([B] bools: the response's
    group is kept, metrics).  Metrics: groups, groups_uniform (dropped: equal rewards), groups_surplus
    (informative, beyond ``keep``), groups_kept, groups_shortfall (keep − kept when too few were informative).
    """
    import numpy as np

    values = np.asarray(rewards, dtype=np.float64).reshape(len(group_ids), -1)
    members: dict[int, list[int]] = {}
    for row, group in enumerate(group_ids):
        members.setdefault(int(group), []).append(row)
    uniform = {g for g, rows in members.items() if np.ptp(values[rows], axis=0).max() <= tolerance}
    informative = [g for g in sorted(members) if g not in uniform]
    order = np.random.default_rng(seed).permutation(len(informative)).tolist()
    kept = {informative[i] for i in order[:keep]}
    return [int(group) in kept for group in group_ids], {
        "groups": len(members), "groups_uniform": len(uniform), "groups_surplus": len(informative) - len(kept),
        "groups_kept": len(kept), "groups_shortfall": max(0, keep - len(kept))}


def gdpo_advantages(components: torch.Tensor, weights, group_ids: torch.Tensor, scale_by_std: bool,
                    eps: float) -> torch.Tensor:
    """GDPO (group reward-decoupled normalisation, arXiv 2601.05242): normalise each reward component within the
    prompt's group before combining, then normalise the sum over the batch,

        A_k,i = (c_k,i − mean_g c_k) / (std_g c_k + ε)          (no std: c_k,i − mean_g c_k)
        Â_i   = (Σ_k w_k A_k,i − mean_B) / (std_B + ε)

    so a component whose scale or spread differs (a 0/1 correctness and a ±0.1 length term) keeps its own say, and
    two responses with different component profiles but equal weighted sums do not get equal advantages.
    components: [B, K]; weights: K; group_ids: [B] -> [B].
    """
    per_component = torch.stack([group_normalize(components[:, k], group_ids, scale_by_std, eps)
                                 for k in range(components.shape[1])], dim=1)
    combined = per_component @ torch.as_tensor(list(weights), dtype=components.dtype)
    std = combined.std(unbiased=True) if combined.numel() > 1 else combined.new_tensor(0.0)
    return (combined - combined.mean()) / (std + eps)


def advantage_settings(params) -> dict:
    """``round_advantages``' keyword arguments that come straight from the params tree (all but kl_coef, which the KL
    controller sets, and moving_baseline, which the previous round carries); the estimator is the algorithm's
    (its registry traits)."""
    adv, traits = params.advantages, params.traits
    return dict(kl_estimator=params.kl.reward_estimator, gamma=adv.gamma, lam=adv.lam,
                whiten_rewards=adv.whiten_rewards, whiten_advantages=adv.whiten_advantages,
                estimator=traits.estimator, return_type=params.reinforce.return_type, baseline=params.reinforce.baseline,
                scale_by_std=params.grpo.scale_by_std, eps=params.grpo.eps,
                group_baseline=traits.group_baseline and traits.estimator == "batch_rtg")


@dataclass(frozen=True)
class _Round:
    """What an estimator reads: [B, T] token rewards, the critic's values and the mask; [B] scores and prompt groups;
    [B, T] reward-to-go G_t; and the settings."""

    rewards: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    scores: torch.Tensor
    groups: torch.Tensor | None
    to_go: torch.Tensor
    gamma: float
    lam: float
    whiten_advantages: bool
    return_type: str
    baseline: str
    moving_baseline: float
    scale_by_std: bool
    eps: float
    components: Any = None
    component_weights: Any = None


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
                   whiten_advantages: bool):
    """The gae estimator: A = GAE(γ, λ) of the token rewards with the critic's values, whitened over every row when
    ``whiten_advantages``; R = A + V.  [B, T] -> ([B, T], [B, T]).  The advantages stage and the critic warm-up's
    refresh (algorithms/common.py) both compute it here."""
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask, shift_mean=True)
    return advantages, returns


def gae_estimator(x: _Round):
    """A = GAE(γ, λ) with the critic's values (whitened with whiten_advantages); R = A + V."""
    return gae_advantages(x.rewards, x.values, x.mask, x.gamma, x.lam, x.whiten_advantages)


def return_estimator(x: _Round):
    """A_t = G − b: G the sequence return Σ_t γ^t r_t, or the reward-to-go G_t (return_type); b none (0), the moving
    average of past mean returns, or the leave-one-out group mean (baseline).  R = G_t."""
    sequence_return = x.to_go[:, 0]
    signal = x.to_go if x.return_type == "reward_to_go" else sequence_return.unsqueeze(-1).expand_as(x.to_go)
    if x.baseline == "moving_average":
        baseline = torch.full_like(sequence_return, x.moving_baseline)
    elif x.baseline == "leave_one_out":
        baseline = leave_one_out_baseline(sequence_return, x.groups)
    else:
        baseline = torch.zeros_like(sequence_return)
    return (signal - baseline.unsqueeze(-1)) * x.mask, x.to_go


def group_estimator(x: _Round):
    """A_i = (s_i − mean_g s) / (std_g s + ε) from the scores alone, for every token of response i; with components
    [B, K] and their weights, GDPO's per-component normalisation instead (``gdpo_advantages``).  R = G_t."""
    if x.components is not None:
        per_sequence = gdpo_advantages(torch.as_tensor(x.components, dtype=torch.float32), x.component_weights,
                                       x.groups, x.scale_by_std, x.eps)
    else:
        per_sequence = group_normalize(x.scores, x.groups, x.scale_by_std, x.eps)
    return per_sequence.unsqueeze(-1) * x.mask, x.to_go


def leave_one_out_estimator(x: _Round):
    """A_i = G_i − mean_{j≠i in the prompt's group} G_j, for every token of response i.  R = G_t."""
    sequence_return = x.to_go[:, 0]
    per_sequence = sequence_return - leave_one_out_baseline(sequence_return, x.groups)
    return per_sequence.unsqueeze(-1) * x.mask, x.to_go


def batch_rtg_estimator(x: _Round):
    """A_t = the reward-to-go G_t whitened over the whole batch (REINFORCE++).  R = G_t."""
    return masked_whiten(x.to_go, x.mask, shift_mean=True), x.to_go


# Advantage estimators by name (the registry's Traits.estimator): ([B, T] advantages, [B, T] returns) of a round.
# The critic-free ones return the reward-to-go, so a critic can still be fitted.
ESTIMATORS = {"gae": gae_estimator, "return": return_estimator, "group": group_estimator,
              "leave_one_out": leave_one_out_estimator, "batch_rtg": batch_rtg_estimator}


def group_mean_centred(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """s_i − mean_{j in i's group} s_j (REINFORCE++-baseline's per-prompt baseline).  [B] -> [B]."""
    return group_normalize(scores, group_ids, scale_by_std=False, eps=0.0)


def round_advantages(logprobs, ref_logprobs, values, scores, *, kl_coef: float, kl_estimator: str, gamma: float,
                     lam: float, whiten_rewards: bool, whiten_advantages: bool, estimator: str = "gae",
                     group_ids=None, return_type: str = "sequence", baseline: str = "none",
                     moving_baseline: float = 0.0, scale_by_std: bool = True, eps: float = 1e-6,
                     group_baseline: bool = False, components=None, component_weights=None) -> tuple[dict, dict]:
    """The advantages step of one round, on ragged per-response arrays.

    logprobs, ref_logprobs, values: lists of [T_i] arrays (ref_logprobs None in the KL-free mode: no KL, and no KL
    metrics); scores: [B]; group_ids: [B] (the prompt of each response) for the group estimators.  Token rewards
    are r_t = −β·kl_t plus the score (less its group's mean with ``group_baseline``) on the
    last token (β = 0 for the group estimator, whose algorithms put their KL in the loss); then ``estimator``,
    one of ESTIMATORS (the algorithm's, from its registry traits), gives the advantages and returns.

    Returns ({'kl', 'rewards', 'advantages', 'returns'}: lists of float32 arrays, metrics dict).  For the
    critic-free estimators ``returns`` is the reward-to-go, so a critic can still be fitted.
    """
    from rlhf_core.rl.kl import kl_estimate

    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}: one of {', '.join(ESTIMATORS)}")
    if components is not None and estimator != "group":
        raise ValueError(f"per-component (GDPO) normalisation is the group estimator's, not the {estimator!r} one's")
    logprobs_t, mask = pad_sequences(logprobs)
    with_reference = ref_logprobs is not None
    if not with_reference and kl_coef != 0.0:
        raise ValueError(f"kl_coef = {kl_coef} needs the reference's log-probs (ref_logprobs is None)")
    ref_t = pad_sequences(ref_logprobs)[0] if with_reference else logprobs_t
    values_t, _ = pad_sequences(values)
    scores_t = torch.as_tensor(scores, dtype=torch.float32)
    groups = None if group_ids is None else torch.as_tensor(group_ids, dtype=torch.long)
    if estimator in ("group", "leave_one_out") or baseline == "leave_one_out" or group_baseline:
        if groups is None:
            raise ValueError(f"{estimator} advantages need the prompt group of every response")
    kl = kl_estimate(kl_estimator, logprobs_t, ref_t) * mask
    reward_kl_coef = 0.0 if estimator == "group" else kl_coef  # group-normalised scores carry no token reward
    scored = group_mean_centred(scores_t, groups) if group_baseline else scores_t
    rewards = token_rewards(scored, kl, mask, reward_kl_coef)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    to_go = reward_to_go(rewards, mask, gamma)
    sequence_return = to_go[:, 0]
    advantages, returns = ESTIMATORS[estimator](_Round(
        rewards, values_t, mask, scores_t, groups, to_go, gamma, lam, whiten_advantages, return_type, baseline,
        moving_baseline, scale_by_std, eps, components, component_weights))

    for name, tensor in (("rewards", rewards), ("advantages", advantages), ("returns", returns)):
        if not torch.isfinite(tensor).all():
            row = int((~torch.isfinite(tensor)).any(-1).nonzero()[0])
            raise FloatingPointError(f"{name} are not finite at response {row}")
    lengths = mask.sum(-1).long().tolist()
    sequence_kl = kl.sum(-1)

    def ragged(tensor):
        return [tensor[row, :length].numpy().astype("float32") for row, length in enumerate(lengths)]

    metrics = {
        "kl_coef": float(reward_kl_coef),
        **({"kl_sequence_mean": float(sequence_kl.mean()),
            "kl_k1_sequence_mean": float(((logprobs_t - ref_t) * mask).sum(-1).mean())} if with_reference else {}),
        "score_mean": float(scores_t.mean()),
        "score_std": float(scores_t.std(unbiased=False)),
        "return_sequence_mean": float(sequence_return.mean()),
        "non_score_reward_mean": float((-reward_kl_coef * sequence_kl).mean()),
        "advantage_mean": float(masked_mean(advantages, mask)),
        "advantage_std": float(masked_var(advantages, mask).sqrt()),
        "return_mean": float(masked_mean(returns, mask)),
        "value_mean": float(masked_mean(values_t, mask)),
        "value_explained_variance": explained_variance(values_t, returns, mask),
    }
    return {"kl": ragged(kl), "rewards": ragged(rewards), "advantages": ragged(advantages),
            "returns": ragged(returns)}, metrics


# ---------------------------------------------------------------------------------------------------
# One round, as the advantages stage computes it


def advantages_of_round(params, rollouts, scores, carried: dict, seed: int, where: str = "the round",
                        components: tuple | None = None):
    """The advantages stage's work on one round's tables, with nothing read or written: the KL coefficient (fixed,
    or adaptive from ``carried``, the state in the start checkpoint), dynamic sampling's kept groups, the
    algorithm's advantages on them (``round_advantages``), the rows the update trains on, and the state for the
    next round.

    rollouts: DataFrame with prompt_index, logprobs, values, ended_with_eos (and ref_logprobs unless KL-free);
    scores: DataFrame with total, one row per rollout; components: (the [B, K] weighted reward components, their
    K weights) with grpo.normalize: components (GDPO; ``phases.rewards.reward_components``).  Returns (columns: per-row
    kl, rewards, advantages, returns as float32 arrays and trained as bools; metrics; state {kl_coef,
    reward_baseline}).  DataError when nothing is left to train on."""
    from rlhf_core.errors import DataError
    from rlhf_core.rl.kl import AdaptiveKLController, FixedKLController

    adv, kl = params.advantages, params.kl
    if len(scores) != len(rollouts):
        raise DataError(f"the scores of {where} have {len(scores)} rows for {len(rollouts)} rollouts; re-run its score stage")
    reward_coef = params.kl_reward_coef  # `auto` resolved
    controller = (AdaptiveKLController(carried.get("kl_coef", reward_coef), kl.target, kl.horizon) if kl.adaptive
                  else FixedKLController(reward_coef))
    baseline = carried.get("reward_baseline", 0.0)
    total, groups = scores["total"].tolist(), rollouts["prompt_index"].tolist()
    if (components is not None) != (params.grpo.normalize == "components"):
        raise ValueError("advantages_of_round: the reward components are given exactly when grpo.normalize is components")
    components, weights = components or (None, None)  # GDPO: each weighted reward component, not the total
    sampled, sampling = [True] * len(rollouts), {}
    if adv.dynamic_sampling:  # DAPO: drop the groups whose rewards are all equal, keep prompts_per_round of the rest
        sampled, sampling = dynamic_sampling(components or [[value] for value in total], groups,
                                             keep=params.rollout.prompts_per_round, seed=seed)
        if not any(sampled):
            raise DataError(f"advantages.dynamic_sampling: every prompt group of {where} has equal rewards, so nothing "
                            "is left to train on; raise rollout.oversample or rollout.samples_per_prompt")
    rows = [row for row, kept in enumerate(sampled) if kept]

    masks = rollouts["policy_mask"].tolist() if "policy_mask" in rollouts else None  # episodes

    def kept(column, tokens=False):
        """The kept rows of a column; of a per-token one (``tokens``), only the policy's tokens in an episode."""
        values = [column[row] for row in rows]
        return policy_tokens(values, kept(masks)) if tokens and masks is not None else values

    settings = advantage_settings(params)
    arrays, metrics = round_advantages(
        kept(rollouts["logprobs"].tolist(), True),
        kept(rollouts["ref_logprobs"].tolist(), True) if params.uses_reference else None,
        kept(rollouts["values"].tolist(), True), kept(total), kl_coef=controller.value, group_ids=kept(groups),
        moving_baseline=baseline, **settings,
        **({"components": kept(components), "component_weights": weights} if components is not None else {}))
    if masks is not None:  # back onto every response token: 0 on the environment's
        arrays = {name: spread_policy_tokens(values, kept(masks)) for name, values in arrays.items()}
    arrays = expand_rows(arrays, rows, rollouts["logprobs"].map(len).tolist())  # dropped groups: zeros, untrained
    trained, selection = trained_responses(rollouts["ended_with_eos"].tolist(), mask_truncated=adv.mask_truncated,
                                           sampled=sampled)
    if not any(trained):
        raise DataError(f"every response of {where} left for training hit rollout.max_new_tokens without EOS, so "
                        "advantages.mask_truncated leaves nothing to train on; raise rollout.max_new_tokens or set "
                        "advantages.mask_truncated: false")
    arrays["trained"] = trained  # optimize trains on these rows only
    metrics.update(selection, **sampling)
    momentum = params.reinforce.baseline_momentum
    state = {
        "kl_coef": controller.update(metrics.get("kl_sequence_mean", 0.0), len(rollouts)),  # KL-free: β stays 0
        "reward_baseline": momentum * baseline + (1.0 - momentum) * metrics["return_sequence_mean"],
    }
    metrics.update(estimator=settings["estimator"], kl_coef_next=state["kl_coef"], reward_baseline=baseline)
    return arrays, metrics, state
