"""Generate the round's responses and record the policy's log-probs, the reference's log-probs and values."""

from rlhf_core.io import atomic_dir, read_parquet, write_json, write_parquet_into
from rlhf_core.runtime.cli import log, ready, run_stage


def main(params, args):
    """Sample responses for round --round into rollouts/<round>/rollouts.parquet."""
    from rlhf_core.io import checkpoint_dir
    from rlhf_core.model.chat import encode_prompts
    from rlhf_core.model.device import seed_everything
    from rlhf_core.model.loading import checkpoint_stop_ids, load_tokenizer
    from rlhf_core.phases.rollout import check_finite, rollout_table, sample_prompt_indices
    from rlhf_core.runtime.distributed import start_runtime

    round_key = args.round
    start_from = params.rounds[round_key].start_from
    seed = params.round_seed(round_key, "rollout")
    seed_everything(seed)
    runtime = start_runtime(params)  # one process, or one rank of `accelerate launch` (compute.num_processes)

    train = read_parquet("prompts/train.parquet", ("prompt",))
    indices = sample_prompt_indices(len(train), params.prompt_groups_per_round, seed)  # × rollout.oversample
    prompts = [train["prompt"].iloc[i] for i in indices]

    tokenizer = load_tokenizer(checkpoint_dir(start_from), params.trust_remote_code)
    messages = [train["messages"].iloc[i] for i in indices] if "messages" in train else None
    # episodes (environment.kind): the environment writes each conversation from its prompt row
    prompts_in = ([train.iloc[i].to_dict() for i in indices] if params.multi_turn
                  else encode_prompts(tokenizer, prompts, chat=params.chat, messages=messages))
    stop_ids = checkpoint_stop_ids(checkpoint_dir(start_from), tokenizer)
    samples, stats, served, episodes = sample_round(params, start_from, runtime, tokenizer, prompts_in, stop_ids, seed)
    if not runtime.is_main:  # rank 0 alone writes the one Parquet file and the metrics
        runtime.close()
        return
    check_finite(stats, f"rollout@{round_key}")
    table = rollout_table(prompts, samples, stats, tokenizer)
    if episodes is not None:  # the response is the final answer; the whole episode is in its own columns
        from rlhf_core.phases.episodes import episode_columns, final_answer

        table = table.assign(response=[final_answer(e) for e in episodes], **episode_columns(episodes))
    if "answer" in train:  # reference answers travel with the responses, for verifiable scorers
        table["answer"] = [str(train["answer"].iloc[indices[p]]) for p in table["prompt_index"]]
    metrics = rollout_metrics(table, params, served)
    if not params.uses_reference:
        log(f"rollout@{round_key}: KL-free (kl.reward_coef and kl.loss_coef are 0, kl.monitor is off): π_ref was not "
            "loaded; evaluate still reports the KL to sft")
    log(f"rollout@{round_key}: {metrics}")
    for text in table["prompt"].head(2) + table["response"].head(2):
        log(f"  sample: {text!r}")
    with atomic_dir(f"rollouts/{round_key}") as out:
        write_parquet_into(out, "rollouts.parquet", table)
    write_json(f"metrics/{round_key}/rollout.json", metrics)
    runtime.close()


def sample_round(params, start_from, runtime, tokenizer, prompts_in, stop_ids, seed):
    """The rollout stage's round: the samples (from the warm vLLM engine with rollout.engine: vllm, attached or
    started first so that it starts while the HF models load; episodes with the environment when there is one,
    ``prompts_in`` then the prompt rows instead of their token ids; else HF generate), then the log-probs, reference
    log-probs and values of the training forward pass.  Returns (samples, stats, the engine's metrics, the episodes
    or None)."""
    from rlhf_core.io import checkpoint_dir

    engine = None
    if params.rollout.engine == "vllm":
        from rlhf_core.phases.vllm_client import open_engine, require_vllm_installed

        require_vllm_installed()
        engine = open_engine(params, checkpoint_dir(start_from))
    try:
        return _sample_and_record(params, start_from, runtime, engine, tokenizer, prompts_in, stop_ids, seed)
    except BaseException:
        if engine is not None and not params.vllm.keep_warm:  # a cold engine never outlives its stage
            engine.stop()
        raise


def _sample_and_record(params, start_from, runtime, engine, tokenizer, prompts_in, stop_ids, seed):
    import time
    from pathlib import Path

    from rlhf_core.io import checkpoint_dir
    from rlhf_core.model.checkpoints import load_actor_critic
    from rlhf_core.model.loading import adapter_base, is_adapter_checkpoint, load_causal_lm
    from rlhf_core.phases.rollout import check_context, context_length, generate_samples, record_token_stats
    from rlhf_core.runtime.stage_times import add_work

    ro, device, dtype = params.rollout, runtime.device, params.compute.param_dtype
    actor_critic = load_actor_critic(checkpoint_dir(start_from), params.algorithm.critic, device,
                                     params.trust_remote_code, param_dtype=dtype,
                                     critic_init=params.algorithm.critic_init)
    reference_is_policy = start_from == "sft"
    # A LoRA policy on models/sft: π_ref is that very model with its adapters disabled (reference None), no copy.
    adapters_on_sft = is_adapter_checkpoint(checkpoint_dir(start_from)) and (
        Path(adapter_base(checkpoint_dir(start_from))).resolve() == Path(checkpoint_dir("sft")).resolve())
    # KL-free (both KL coefficients 0, kl.monitor off): π_ref is neither loaded nor run, and no ref_logprobs are stored
    with_reference = params.uses_reference
    reference = None if reference_is_policy or adapters_on_sft or not with_reference else load_causal_lm(
        checkpoint_dir("sft"), device, params.trust_remote_code, param_dtype=dtype)
    ready()
    served, episodes, prompt_ids = {}, None, prompts_in
    started = time.perf_counter()
    if params.multi_turn:  # episodes with the environment, on the engine or HF generate
        from rlhf_core.phases.episodes import sample_round_episodes

        samples, served, episodes = sample_round_episodes(params, checkpoint_dir(start_from), actor_critic.policy,
                                                          engine, tokenizer, prompts_in, stop_ids=stop_ids, seed=seed,
                                                          device=device)
    elif engine is not None:  # load the checkpoint into the engine, prove it by the probe, then sample
        from rlhf_core.phases.vllm_client import serve_round

        samples, served = serve_round(engine, params, checkpoint_dir(start_from), actor_critic.policy, tokenizer,
                                      prompt_ids, seed=seed, stop_ids=stop_ids, device=device, runtime=runtime)
    else:
        check_context(prompt_ids, ro.max_new_tokens, context_length(actor_critic.policy.config), "train prompts")
        samples = generate_samples(actor_critic.policy, tokenizer, prompt_ids, samples_per_prompt=ro.samples_per_prompt,
                                   temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                   max_new_tokens=ro.max_new_tokens, batch_size=ro.batch_size, seed=seed,
                                   device=device, runtime=runtime, stop_ids=stop_ids,
                                   record_sampler_logprobs=params.records_sampler_logprobs)
    add_work("generation_tokens", sum(len(s.response_ids) for s in samples), time.perf_counter() - started)
    stats = record_token_stats(actor_critic, reference, samples, pad_id=tokenizer.pad_token_id,
                               temperature=ro.temperature, batch_size=ro.forward_batch_size, device=device,
                               reference_is_policy=reference_is_policy, with_reference=with_reference,
                               runtime=runtime)
    return samples, stats, served, episodes


def rollout_metrics(table, params, served: dict) -> dict:
    """The rollout stage's metrics of its table: size, length, EOS share, the engine's (``served``), the sampler's
    mismatch to the trainer when sampler_logprobs are stored, and the sequence KL to π_ref unless KL-free."""
    from rlhf_core.rl.advantages import pad_sequences

    metrics = {
        "responses": len(table),
        "response_length_mean": float(table["response_length"].mean()),
        "eos_fraction": float(table["ended_with_eos"].mean()),
        **served,  # engine: vllm: the served checkpoint's checksum and the probe's agreement
    }
    if params.records_sampler_logprobs:  # how far the sampler is from the trainer (rollout_correction)
        from rlhf_core.rl.losses import sampler_mismatch

        trainer, mask = pad_sequences(table["logprobs"].tolist())
        mismatch = sampler_mismatch(trainer, pad_sequences(table["sampler_logprobs"].tolist())[0], mask)
        metrics.update({f"mismatch_{name}": value for name, value in mismatch.items()})
    if "turns" in table:  # episodes: the environment's reward, turns, tool calls, the share that hit a limit
        from rlhf_core.phases.episodes import episode_metrics

        metrics.update(episode_metrics(table["turns"], table["tool_calls"], table["parse_errors"], table["limit"],
                                       table["episode_reward"]))
        metrics["policy_tokens_mean"] = float(table["policy_mask"].map(lambda mask: mask.sum(dtype="int64")).mean())
    if params.uses_reference:
        trained = table["policy_mask"] if "policy_mask" in table else table["logprobs"].map(lambda lp: 1)
        metrics["kl_k1_mean"] = float(sum(float(((lp - rl) * mask).sum()) for lp, rl, mask in zip(
            table["logprobs"], table["ref_logprobs"], trained)) / len(table))
    return metrics


if __name__ == "__main__":
    run_stage(main, name="rollout", needs_round=True)
