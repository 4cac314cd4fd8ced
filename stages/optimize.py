"""Update the policy and critic on the round's experience (PPO) and write the next checkpoint."""

from rlhf_core.cli import log, run_stage
from rlhf_core.io import atomic_dir, read_json, read_parquet, write_json


def main(params, args):
    """Train on rollouts/<round> + advantages/<round>; write models/<round>."""
    from rlhf_core.algorithms import get_algorithm
    from rlhf_core.algorithms.ppo import Experience, old_value_explained_variance
    from rlhf_core.models import checkpoint_dir, load_actor_critic, load_tokenizer, resolve_device, save_checkpoint, \
        seed_everything

    round_key = args.round
    start_from = params.rounds[round_key].start_from
    seed = params.round_seed(round_key, "optimize")
    seed_everything(seed)
    device = resolve_device(params.device)

    rollouts = read_parquet(f"rollouts/{round_key}/rollouts.parquet", ("prompt_ids", "response_ids", "logprobs", "values"))
    advantages = read_parquet(f"advantages/{round_key}/advantages.parquet", ("advantages", "returns"))
    kl_state = read_json(f"advantages/{round_key}/kl_controller.json")
    experience = Experience(rollouts["prompt_ids"].tolist(), rollouts["response_ids"].tolist(),
                            rollouts["logprobs"].tolist(), rollouts["values"].tolist(),
                            advantages["advantages"].tolist(), advantages["returns"].tolist())

    tokenizer = load_tokenizer(checkpoint_dir(start_from))
    model = load_actor_critic(checkpoint_dir(start_from), params.ppo.critic, device)
    train = get_algorithm("ppo")
    metrics = train(model, experience, params.ppo, temperature=params.rollout.temperature,
                    pad_id=tokenizer.pad_token_id, device=device, seed=seed, log=log)
    metrics["value_explained_variance"] = old_value_explained_variance(experience)
    metrics["kl_coef"] = read_json(f"metrics/{round_key}/advantages.json")["kl_coef"]
    log(f"optimize@{round_key}: {metrics}")
    with atomic_dir(checkpoint_dir(round_key)) as out:
        save_checkpoint(out, model, tokenizer, {"kl_coef": kl_state["kl_coef"], "round": round_key})
    write_json(f"metrics/{round_key}/optimize.json", metrics)


if __name__ == "__main__":
    run_stage(main, name="optimize", needs_round=True)
