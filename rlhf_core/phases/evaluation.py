"""Held-out evaluation of a checkpoint: reward (each component), KL to π_ref, perplexity on held-out
demonstrations, distinct-1/2 and mean response length, with fixed sampling seeds so every checkpoint
answers the same prompts under the same random stream."""

from __future__ import annotations

import torch

from rlhf_core.model.batches import collate, length_buckets
from rlhf_core.model.forward import policy_logprobs
from rlhf_core.phases.rollout import check_context, context_length, generate_samples


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / total word n-grams over all texts (Li et al. 2016); 0 if there are none."""
    total, unique = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def exact_match(responses: list[str], answers: list[str]) -> float:
    """Fraction of responses whose stripped text equals their stripped reference answer; 0 if there are none."""
    hits = sum(str(r).strip() == str(a).strip() for r, a in zip(responses, answers, strict=True))
    return hits / len(responses) if responses else 0.0


@torch.inference_mode()
def sequence_kl(policy, reference, samples, *, pad_id: int, temperature: float, batch_size: int, device,
                policy_masks: list | None = None) -> list[float]:
    """Σ_t (log π − log π_ref) per sampled response: the k1 estimate of KL(π‖π_ref), unbiased under π.
    ``policy_masks`` (episodes): the sum runs over the policy's tokens only, not the environment's."""
    from rlhf_core.rl.advantages import pad_sequences

    kls = [0.0] * len(samples)
    for members in length_buckets([len(s.prompt_ids) + len(s.response_ids) for s in samples], batch_size):
        batch = collate([samples[i].prompt_ids for i in members], [samples[i].response_ids for i in members],
                        pad_id).to(device)
        difference = (policy_logprobs(policy, batch, temperature) - policy_logprobs(reference, batch, temperature))
        mask = batch.response_mask
        if policy_masks is not None:
            mask = mask * pad_sequences([policy_masks[i] for i in members])[0][:, :mask.shape[1]].to(mask.device)
        per_sequence = (difference * mask).sum(-1).tolist()
        for row, index in enumerate(members):
            kls[index] = per_sequence[row]
    return kls


def evaluate_checkpoint(policy, reference, tokenizer, prompts: list[str], heldout_encoded, params, device,
                        answers: list[str] | None = None, *, messages: list | None = None,
                        stop_ids: list[int] | None = None, prompt_rows: list[dict] | None = None
                        ) -> tuple[dict, list[dict]]:
    """Metrics of one checkpoint, and its sample responses (prompt, response, reward).

    Prompts are encoded as rollout encodes them (``chat.encode_prompts``; ``messages``: the conversation of
    each prompt, or None), and a response ends at any of ``stop_ids`` (default: the tokenizer's EOS).

    ``reward`` is Σ weight · clip(raw component) − EOS penalty: the raw components, not normalised
    (a running normaliser's state belongs to training, and whitening a fixed eval set says nothing).
    ``heldout_encoded`` None: no perplexity (see ``sft.foreign_demonstrations``).

    With an environment (``params.multi_turn``; ``prompt_rows``: the eval prompts' rows), each sample is an
    episode (``phases.episodes``): the scorers read its final answer and its messages, the KL runs over the
    policy's tokens, and the metrics gain the episode means (``episodes.episode_metrics``: the environment's
    reward, turns and tool calls per episode, the share that hit a limit); each example carries its messages.
    """
    import time

    from rlhf_core.model.chat import encode_prompts
    from rlhf_core.phases.rewards import score_responses
    from rlhf_core.phases.sft import perplexity
    from rlhf_core.runtime.stage_times import add_work

    ev = params.evaluate
    started = time.perf_counter()
    if params.multi_turn:
        samples, responses, metadata, masks, episodes = _eval_episodes(policy, tokenizer, prompt_rows, params, device,
                                                                       stop_ids)
    else:
        prompt_ids = encode_prompts(tokenizer, prompts, chat=params.chat, messages=messages)
        check_context(prompt_ids, ev.max_new_tokens, context_length(policy.config), "eval prompts")
        samples = generate_samples(policy, tokenizer, prompt_ids, samples_per_prompt=ev.samples_per_prompt,
                                   temperature=ev.temperature, top_p=1.0, top_k=0, max_new_tokens=ev.max_new_tokens,
                                   batch_size=ev.batch_size, seed=ev.seed, device=device, stop_ids=stop_ids)
        responses = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        metadata, masks, episodes = [{"answer": answers[s.prompt_index]} if answers else {} for s in samples], None, None
    add_work("generation_tokens", sum(len(s.response_ids) for s in samples), time.perf_counter() - started)
    ended = [s.ended_with_eos for s in samples]
    components, _ = score_responses(params.score.scorers, prompts=[prompts[s.prompt_index] for s in samples],
                                    responses=responses, lengths=[len(s.response_ids) for s in samples],
                                    ended=ended, metadata=metadata, missing_eos_penalty=params.score.missing_eos_penalty,
                                    task=params.task, cpu_threads=params.cpu_threads,
                                    trust_remote_code=params.trust_remote_code, max_new_tokens=ev.max_new_tokens,
                                    where="eval responses", normalise_components=False)
    kls = sequence_kl(policy, reference, samples, pad_id=tokenizer.pad_token_id, temperature=ev.temperature,
                      batch_size=ev.batch_size, device=device, policy_masks=masks)
    metrics = {
        "reward": sum(components["total"]) / len(samples),
        **{f"reward_{name}": sum(values) / len(samples) for name, values in components.items() if name != "total"},
        "kl": sum(kls) / len(kls),
        **({} if heldout_encoded is None else {"perplexity": perplexity(policy, tokenizer, heldout_encoded, device)}),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "length": sum(len(s.response_ids) for s in samples) / len(samples),
        "eos_fraction": sum(ended) / len(samples),
    }
    if answers:  # exact-match accuracy: the stripped response equals the stripped reference answer
        metrics["exact_match"] = exact_match(responses, [answers[s.prompt_index] for s in samples])
    examples = [{"prompt": prompts[s.prompt_index], "response": responses[i], "reward": components["total"][i]}
                for i, s in enumerate(samples)]
    if episodes is not None:
        from rlhf_core.phases.episodes import episode_metrics

        metrics.update(episode_metrics([e.turns for e in episodes], [e.tool_calls for e in episodes],
                                       [e.parse_errors for e in episodes], [e.limit for e in episodes],
                                       [e.reward for e in episodes]))
        for example, episode in zip(examples, episodes):
            example.update(messages=episode.messages, turns=episode.turns, tool_calls=episode.tool_calls,
                           limit=episode.limit or "")
    return metrics, examples


def _eval_episodes(policy, tokenizer, prompt_rows, params, device, stop_ids):
    """The eval prompts' episodes, with evaluate's sampling: (samples, final answers, scorer metadata, policy masks
    over the responses, episodes)."""
    from rlhf_core.phases.episodes import episode_samples, final_answer, run_round_episodes

    ev = params.evaluate
    episodes = run_round_episodes(policy, tokenizer, params, prompt_rows, max_new_tokens=ev.max_new_tokens,
                                  samples_per_prompt=ev.samples_per_prompt, temperature=ev.temperature, top_p=1.0,
                                  top_k=0, batch_size=ev.batch_size, seed=ev.seed, device=device, stop_ids=stop_ids)
    metadata = [{**({"answer": str(prompt_rows[e.prompt_index]["answer"])} if "answer" in prompt_rows[e.prompt_index]
                    else {}), "messages": e.messages, "episode_reward": e.reward} for e in episodes]
    masks = [e.response_policy_mask for e in episodes]
    return episode_samples(episodes), [final_answer(e) for e in episodes], metadata, masks, episodes
