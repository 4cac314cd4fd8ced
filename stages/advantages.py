"""Token rewards (score − β·KL), the algorithm's advantages and returns, and the state for the next round."""

from rlhf_core.cli import log, ready, run_stage
from rlhf_core.errors import DataError
from rlhf_core.io import (
    atomic_dir,
    checkpoint_dir,
    read_parquet,
    read_state,
    write_json,
    write_json_into,
    write_parquet_into,
)


def main(params, args):
    """Compute advantages/<round>/advantages.parquet and state.json (KL coefficient, reward baseline)."""
    import pandas as pd

    from rlhf_core.advantages import (
        advantage_settings,
        dynamic_sampling,
        expand_rows,
        round_advantages,
        trained_responses,
    )
    from rlhf_core.kl import AdaptiveKLController, FixedKLController
    from rlhf_core.rewards import reward_components

    adv, kl, round_key = params.advantages, params.kl_resolved, args.round  # kl: its auto coefficients resolved
    with_reference = params.uses_reference  # KL-free: the rollout stored no ref_logprobs
    rollouts = read_parquet(f"rollouts/{round_key}/rollouts.parquet", ("prompt_index", "logprobs", "values", "ended_with_eos")
                            + (("ref_logprobs",) if with_reference else ()))
    scores = read_parquet(f"scores/{round_key}/scores.parquet", ("total",))
    if len(scores) != len(rollouts):
        raise DataError(f"scores/{round_key} has {len(scores)} rows for {len(rollouts)} rollouts; re-run score@{round_key}")

    ready()
    # State carried across rounds travels inside the checkpoint this round starts from (none for sft).
    carried = read_state(checkpoint_dir(params.rounds[round_key].start_from))
    if kl.adaptive:
        controller = AdaptiveKLController(carried.get("kl_coef", kl.reward_coef), kl.target, kl.horizon)
    else:
        controller = FixedKLController(kl.reward_coef)
    baseline = carried.get("reward_baseline", 0.0)

    total, groups = scores["total"].tolist(), rollouts["prompt_index"].tolist()
    components, weights = None, None
    if params.grpo.normalize == "components":  # GDPO: each weighted reward component, not the total
        components, weights = reward_components(scores, params.score.scorers, params.score.missing_eos_penalty)
    sampled, sampling = [True] * len(rollouts), {}
    if adv.dynamic_sampling:  # DAPO: drop the groups whose rewards are all equal, keep prompts_per_round of the rest
        sampled, sampling = dynamic_sampling(components or [[value] for value in total], groups,
                                             keep=params.rollout.prompts_per_round,
                                             seed=params.round_seed(round_key, "advantages"))
        if not any(sampled):
            raise DataError(f"advantages.dynamic_sampling: every prompt group of rollouts/{round_key} has equal rewards, "
                            "so nothing is left to train on; raise rollout.oversample or rollout.samples_per_prompt")
    rows = [row for row, kept in enumerate(sampled) if kept]

    def kept(column):
        return [column[row] for row in rows]

    settings = advantage_settings(params)
    arrays, metrics = round_advantages(
        kept(rollouts["logprobs"].tolist()), kept(rollouts["ref_logprobs"].tolist()) if with_reference else None,
        kept(rollouts["values"].tolist()), kept(total), kl_coef=controller.value, group_ids=kept(groups),
        moving_baseline=baseline, **settings,
        **({"components": kept(components), "component_weights": weights} if components is not None else {}))
    arrays = expand_rows(arrays, rows, rollouts["logprobs"].map(len).tolist())  # dropped groups: zeros, untrained
    trained, selection = trained_responses(rollouts["ended_with_eos"].tolist(), mask_truncated=adv.mask_truncated,
                                           sampled=sampled)
    if not any(trained):
        raise DataError(f"every response of rollouts/{round_key} left for training hit rollout.max_new_tokens without "
                        "EOS, so advantages.mask_truncated leaves nothing to train on; raise rollout.max_new_tokens or "
                        "set advantages.mask_truncated: false")
    arrays["trained"] = trained  # optimize trains on these rows only
    metrics.update(selection, **sampling)
    momentum = params.reinforce.baseline_momentum
    state = {
        "kl_coef": controller.update(metrics.get("kl_sequence_mean", 0.0), len(rollouts)),  # KL-free: β stays 0
        "reward_baseline": momentum * baseline + (1.0 - momentum) * metrics["return_sequence_mean"],
    }
    metrics.update(estimator=settings["estimator"], kl_coef_next=state["kl_coef"], reward_baseline=baseline)
    log(f"advantages@{round_key}{f' ({params.describe_auto()})' if params.auto_resolved else ''}: {metrics}")
    with atomic_dir(f"advantages/{round_key}") as out:
        write_parquet_into(out, "advantages.parquet", pd.DataFrame(arrays))
        write_json_into(out, "state.json", state)
    write_json(f"metrics/{round_key}/advantages.json", {k: v for k, v in metrics.items() if k != "estimator"})


if __name__ == "__main__":
    run_stage(main, name="advantages", needs_round=True)
