"""Update the policy (and critic) on the round's experience with the chosen algorithm; write the next checkpoint."""

from rlhf_core.io import atomic_dir, read_json, read_parquet, write_json
from rlhf_core.runtime.cli import log, ready, run_stage


def main(params, args):
    """Train on rollouts/<round> + advantages/<round> with algorithm.name; write models/<round>."""
    from rlhf_core.model.device import seed_everything
    from rlhf_core.rl.algorithms.train import train_round
    from rlhf_core.runtime.distributed import start_runtime

    round_key = args.round
    start_from = params.rounds[round_key].start_from
    train = train_round  # one signature for every algorithm; its traits pick the update loop
    seed = params.round_seed(round_key, "optimize")
    seed_everything(seed)  # the same seed on every rank: the same shuffles, the same steps
    runtime = start_runtime(params)  # one process, or one rank of `accelerate launch` (compute.num_processes)
    try:
        _train_and_save(params, round_key, start_from, train, seed, runtime)
    finally:
        runtime.close()


def _train_and_save(params, round_key, start_from, train, seed, runtime):
    from rlhf_core.io import checkpoint_dir
    from rlhf_core.model.checkpoints import load_actor_critic, save_checkpoint
    from rlhf_core.model.loading import enable_gradient_checkpointing, load_tokenizer
    from rlhf_core.rl.algorithms.common import round_experience
    from rlhf_core.rl.optim import load_optimizer_state, save_optimizer_state
    from rlhf_core.runtime.distributed import local_parameter_bytes

    device = runtime.device

    with_reference = params.uses_reference  # KL-free: the rollout stored no ref_logprobs
    correction = params.sampler_correction  # rollout_correction resolved: none, tis or mis
    rollouts = read_parquet(f"rollouts/{round_key}/rollouts.parquet", ("prompt_ids", "response_ids", "logprobs", "values")
                            + (("ref_logprobs",) if with_reference else ())
                            + (("sampler_logprobs",) if correction != "none" else ()))
    advantages = read_parquet(f"advantages/{round_key}/advantages.parquet", ("advantages", "returns", "rewards",
                                                                             "trained"))
    state = {**read_json(f"scores/{round_key}/state.json"), **read_json(f"advantages/{round_key}/state.json")}
    experience, correction_metrics = round_experience(params, rollouts, advantages)

    tokenizer = load_tokenizer(checkpoint_dir(start_from), params.trust_remote_code)
    # fsdp: ranks other than 0 build the structure only (meta) and get their shards from rank 0 (runtime.prepare)
    model = load_actor_critic(checkpoint_dir(start_from), params.algorithm.critic, runtime.load_device,
                              params.trust_remote_code, lora=params.lora, param_dtype=params.compute.param_dtype,
                              critic_init=params.algorithm.critic_init)
    # what each process read from disk (fsdp: rank 0 only); every rank joins the gather
    loaded_bytes = runtime.all_gather(local_parameter_bytes(model))
    if params.compute.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # optim.carry_state: AdamW continues from the state saved beside the start checkpoint (none beside sft)
    # rank 0 reads it; the other ranks get their share by broadcast
    carry = ({"state": load_optimizer_state(checkpoint_dir(start_from)) if runtime.is_main else None}
             if params.optim.carry_state else None)
    if carry is not None and runtime.is_main and carry["state"] is None and start_from != "sft":
        log(f"optimize@{round_key}: models/{start_from} holds no optimizer state (trained with optim.carry_state off): "
            "a fresh AdamW")
    # algorithm.critic_warmup_epochs: on a round whose critic is new (it starts from sft: critic_init's critic);
    # the advantages are then recomputed from the token rewards with the warmed critic's values
    warmup = params.algorithm.critic_warmup_epochs if start_from == "sft" else 0
    ready()
    metrics = train(model, experience, params, temperature=params.rollout.temperature,
                    pad_id=tokenizer.pad_token_id, device=device, seed=seed,
                    log=log if runtime.is_main else (lambda *_: None), carry=carry, critic_warmup_epochs=warmup)
    if carry is not None:
        metrics["optimizer_state_carried"] = carry.get("carried_in", False)
    if runtime.distributed:
        metrics["loaded_parameter_bytes_other_ranks"] = max(loaded_bytes[1:])
    full_state = runtime.full_state_dict(model)  # fsdp: gathered from the shards (every rank joins)
    if not runtime.is_main:  # rank 0 alone writes the checkpoint and the metrics
        return
    advantages_metrics = read_json(f"metrics/{round_key}/advantages.json")
    metrics.update(correction_metrics)
    metrics.update(kl_coef=advantages_metrics["kl_coef"],
                   value_explained_variance=advantages_metrics["value_explained_variance"],
                   score_mean=advantages_metrics["score_mean"])
    log(f"optimize@{round_key} ({params.describe_auto('loss_coef') or params.algorithm.name}): {metrics}")
    with atomic_dir(checkpoint_dir(round_key)) as out:
        save_checkpoint(out, model, tokenizer, {**state, "round": round_key, "algorithm": params.algorithm.name},
                        state_dict=full_state)
        if carry is not None and carry.get("state") is not None:
            save_optimizer_state(out, carry["state"])
    write_json(f"metrics/{round_key}/optimize.json", metrics)


if __name__ == "__main__":
    run_stage(main, name="optimize", needs_round=True)
