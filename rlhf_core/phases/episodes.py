"""Multi-turn rollouts, token-in/token-out: policy turns and environment turns, as one stream of token ids.

One episode is a single id sequence that only ever grows:

    [conversation before turn 1 (rendered once)] [policy turn 1 (sampled ids)] [observation 1] [policy turn 2] …
     policy_mask: 0 …                             1 …                           0 …             1 …

- The ids a policy turn sampled are stored as sampled, and the next turn is generated from exactly that
  stream: they are never decoded and encoded again (re-tokenizing can change them, and then the log-probs used
  in training are not those of the sampled tokens: trl#5224, verl#6719).
- An environment's messages are rendered by the chat template once, as the text the template appends after the
  conversation so far (``observation_text``), tokenized once and appended as ids with policy_mask 0: context
  for later turns, never trained on.
- Each policy turn stops at the first of ``stop_ids`` (the template's end of turn), or at ``max_new_tokens``
  (then the episode ends: limit "max_new_tokens").  At most ``max_turns`` policy turns (limit "max_turns"), and
  the stream never grows past ``max_episode_tokens`` (limit "max_episode_tokens"); the environment's
  ``score`` still rates an episode that hit a limit, and the limit is recorded.

Generation is batched over the episodes still running, each turn's batch seeded with ``seed + 1000 · turn +
batch number``: by HF generate, left-padded as in ``phases.rollout.generate_samples``, or by any ``generate_turn``
that takes token ids and gives token ids back (the warm vLLM engine: ``vllm_client.episode_turns``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf_core.errors import DataError
from rlhf_core.model.batches import left_padded, length_buckets
from rlhf_core.model.chat import needs_bos
from rlhf_core.phases import environments
from rlhf_core.phases.rollout import generation_config, only_this_config, truncate_at_eos

LIMITS = ("max_turns", "max_episode_tokens", "max_new_tokens")


@dataclass
class Episode:
    prompt_index: int
    sample_index: int
    token_ids: list[int]  # the whole stream: conversation, policy turns, observations
    policy_mask: list[int]  # 1 where the policy sampled the token, 0 for the prompt and the environment's tokens
    prompt_length: int  # tokens before the first policy turn
    turn_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each policy turn in token_ids
    messages: list[dict] = field(default_factory=list)  # the conversation, for the environment, scorers and samples
    turn_rewards: list[float | None] = field(default_factory=list)
    tool_calls: int = 0
    parse_errors: int = 0
    limit: str | None = None  # None: the environment ended it; else one of LIMITS
    reward: float = 0.0  # the environment's score of the whole episode
    done: bool = False

    @property
    def turns(self) -> int:
        return len(self.turn_spans)

    # The episode in the single-turn training layout: the conversation before the first policy turn is the prompt,
    # everything after it (policy and environment tokens in their order) the response, and the mask over the
    # response is ``Experience.policy_mask`` (the loss, the KL and the token counts cover the policy's tokens only;
    # the environment's stay in the sequence as context).
    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[:self.prompt_length]

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_length:]

    @property
    def response_policy_mask(self) -> list[int]:
        return self.policy_mask[self.prompt_length:]

    def view(self) -> dict:
        """What ``score`` sees: no token ids."""
        return {"messages": list(self.messages), "turns": self.turns, "tool_calls": self.tool_calls,
                "parse_errors": self.parse_errors, "turn_rewards": list(self.turn_rewards), "limit": self.limit}


def render(tokenizer, messages: list[dict], tools, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def check_template(tokenizer, tools) -> None:
    """A chat template is needed, and one that renders the tools when the environment has some."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("multi-turn rollouts need the policy tokenizer's chat template, and it has none; use a "
                        "model with one")
    if tools:
        probe = [{"role": "user", "content": "x"}]
        if render(tokenizer, probe, tools, generation_prompt=True) == render(tokenizer, probe, None,
                                                                             generation_prompt=True):
            raise DataError("the environment has tools, but the policy's chat template does not render them "
                            "(apply_chat_template(tools=...) adds nothing); use a model whose template supports tools")


def observation_text(tokenizer, history: list[dict], assistant: dict, new_messages: list[dict], tools,
                     sampled_text: str, stop_text: str) -> str:
    """The text that follows a policy turn's sampled ids up to the next turn's generation prompt: what the template
    writes after the turn's end token (a newline in ChatML), then ``new_messages`` as the template renders them
    after the conversation so far, then the assistant's generation prompt.  ``sampled_text``: the turn's ids
    decoded, its end token included; ``stop_text``: that end token's text."""
    before_turn = render(tokenizer, history, tools, generation_prompt=True)
    through_turn = render(tokenizer, history + [assistant], tools, generation_prompt=False)
    after = render(tokenizer, history + [assistant] + new_messages, tools, generation_prompt=True)
    if not through_turn.startswith(before_turn) or not after.startswith(through_turn):
        raise DataError("the chat template renders earlier turns differently once later ones follow, so an "
                        "observation cannot be appended to the sampled ids; use a template that only appends")
    turn_text = through_turn[len(before_turn):]  # e.g. "<content><|im_end|>\n"
    if turn_text.startswith(sampled_text):
        glue = turn_text[len(sampled_text):]
    else:  # the template writes the content differently from its decoded ids: cut after its end token
        end = turn_text.rfind(stop_text) if stop_text else -1
        glue = turn_text[end + len(stop_text):] if end >= 0 else ""
    return glue + after[len(through_turn):]


def _start(tokenizer, environment, row: dict, tools, bos: bool, prompt_index: int, sample_index: int) -> Episode:
    messages = environments.reset(environment, row)
    ids = tokenizer(render(tokenizer, messages, tools, generation_prompt=True), add_special_tokens=False)["input_ids"]
    if bos and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id, *ids]
    return Episode(prompt_index, sample_index, list(ids), [0] * len(ids), len(ids), messages=list(messages))


def _generate(policy, tokenizer, streams: list[list[int]], config, seed: int, device) -> torch.Tensor:
    input_ids, attention_mask = left_padded(streams, tokenizer.pad_token_id)
    width = input_ids.shape[1]
    torch.manual_seed(seed)
    with only_this_config(policy, config):
        output = policy.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config)
    return output[:, width:].cpu()


def assistant_text(tokenizer, content_ids: list[int]) -> str:
    """The text of one assistant turn as the environment reads it: the turn's ids decoded with their special
    tokens kept (a model whose ``<tool_call>`` is a special token still shows its markers), less the ids that only
    frame text: BOS, EOS and pad (the end of turn is cut before this)."""
    framing = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    return tokenizer.decode([token for token in content_ids if token not in framing], skip_special_tokens=False)


def _take_turn(tokenizer, environment, episode: Episode, sampled: list[int], stop_ids, tools, *, max_turns: int,
               max_new_tokens: int, max_episode_tokens: int) -> None:
    """Append one policy turn's sampled ids (at most its own room), ask the environment, append its answer."""
    room = min(max_new_tokens, max_episode_tokens - len(episode.token_ids))
    response, ended = truncate_at_eos(sampled[:room], stop_ids)
    start = len(episode.token_ids)
    episode.token_ids += response
    episode.policy_mask += [1] * len(response)
    episode.turn_spans.append((start, len(episode.token_ids)))
    content_ids = response[:-1] if ended else response
    assistant = {"role": "assistant", "content": assistant_text(tokenizer, content_ids)}
    history = list(episode.messages)
    episode.messages.append(assistant)
    if not ended:
        over_budget = len(episode.token_ids) >= max_episode_tokens
        episode.limit, episode.done = ("max_episode_tokens" if over_budget else "max_new_tokens"), True
        return
    new_messages, reward, done, info = environments.step(environment, assistant)
    episode.turn_rewards.append(reward)
    episode.tool_calls += info.get("tool_calls", 0)
    episode.parse_errors += info.get("parse_errors", 0)
    if done:
        episode.done = True
        return
    text = observation_text(tokenizer, history, assistant, new_messages, tools, tokenizer.decode(response),
                            tokenizer.decode(response[-1:]))
    observation = tokenizer(text, add_special_tokens=False)["input_ids"]
    episode.messages += new_messages
    episode.token_ids += observation
    episode.policy_mask += [0] * len(observation)
    if episode.turns >= max_turns:
        episode.limit, episode.done = "max_turns", True
    elif len(episode.token_ids) >= max_episode_tokens:
        episode.limit, episode.done = "max_episode_tokens", True


def hf_turns(policy, tokenizer, *, temperature: float, top_p: float, top_k: int, stop_ids: list[int], device):
    """The HF generator of policy turns: (streams of token ids, max new tokens, seed) -> the ids sampled after
    each stream (padded rows; ``_take_turn`` cuts each at its end of turn)."""
    def generate_turn(streams: list[list[int]], max_new_tokens: int, seed: int) -> list[list[int]]:
        config = generation_config(tokenizer, temperature=temperature, top_p=top_p, top_k=top_k,
                                   max_new_tokens=max_new_tokens, stop_ids=stop_ids)
        return _generate(policy, tokenizer, streams, config, seed, device).tolist()

    return generate_turn


@torch.inference_mode()
def run_episodes(policy, tokenizer, make_environment, prompt_rows: list[dict], *, samples_per_prompt: int,
                 temperature: float, top_p: float, top_k: int, max_new_tokens: int, max_turns: int,
                 max_episode_tokens: int, batch_size: int, seed: int, device: torch.device,
                 stop_ids: list[int] | None = None, generate_turn=None) -> list[Episode]:
    """``samples_per_prompt`` episodes per prompt row, in (prompt, sample) order, each with its own environment
    (``make_environment()``), run to its end or a limit, then scored by its environment.  ``generate_turn``
    (streams, max_new_tokens, seed) -> sampled ids: the policy turns' generator; None: HF generate on ``policy``."""
    stop_ids = list(stop_ids or [tokenizer.eos_token_id])
    generate_turn = generate_turn or hf_turns(policy, tokenizer, temperature=temperature, top_p=top_p, top_k=top_k,
                                              stop_ids=stop_ids, device=device)
    jobs = [(p, s) for p in range(len(prompt_rows)) for s in range(samples_per_prompt)]
    envs = [make_environment() for _ in jobs]
    tools = environments.tools_of(envs[0]) if envs else None
    check_template(tokenizer, tools)
    bos = needs_bos(tokenizer)
    episodes = [_start(tokenizer, env, prompt_rows[p], tools, bos, p, s) for env, (p, s) in zip(envs, jobs)]
    for episode in episodes:
        if episode.prompt_length >= max_episode_tokens:
            raise DataError(f"prompt row {episode.prompt_index}: {episode.prompt_length} tokens before the first "
                            f"turn, at least rollout.max_episode_tokens = {max_episode_tokens}")
    for turn in range(max_turns):
        running = [i for i, e in enumerate(episodes) if not e.done]
        if not running:
            break
        lengths = [len(episodes[i].token_ids) for i in running]
        for batch_number, members in enumerate(length_buckets(lengths, batch_size)):
            batch = [running[m] for m in members]
            room = max(max_episode_tokens - len(episodes[i].token_ids) for i in batch)  # each keeps its own room
            sampled = generate_turn([list(episodes[i].token_ids) for i in batch], min(max_new_tokens, room),
                                    seed + 1000 * turn + batch_number)
            for row, index in enumerate(batch):
                _take_turn(tokenizer, envs[index], episodes[index], list(sampled[row]), stop_ids, tools,
                           max_turns=max_turns, max_new_tokens=max_new_tokens, max_episode_tokens=max_episode_tokens)
    for env, episode in zip(envs, episodes):  # every one is done: _take_turn ends it at max_turns at the latest
        episode.reward = environments.score(env, episode.view())
    return episodes


def episode_samples(episodes: list[Episode]):
    """The episodes as rollout Samples (``phases.rollout.Sample``): prompt_ids the conversation before the first
    policy turn, response_ids everything after it; ``ended_with_eos`` is true when the environment ended the episode
    (no limit), so ``score.missing_eos_penalty`` and ``advantages.mask_truncated`` treat a limit as a truncation."""
    from rlhf_core.phases.rollout import Sample

    return [Sample(e.prompt_index, e.sample_index, e.prompt_ids, e.response_ids, e.limit is None) for e in episodes]


def final_answer(episode: Episode) -> str:
    """The last assistant message's content: what single-turn scorers read as the response."""
    return next((m["content"] for m in reversed(episode.messages) if m["role"] == "assistant"), "")


def episode_columns(episodes: list[Episode]) -> dict[str, list]:
    """The rollout table's episode columns: policy_mask over response_ids, the policy turns' [start, end) in
    response_ids, the counts, the limit ("" when the environment ended it), the environment's score of the episode
    and its reward of each turn (JSON: a number or null per turn that reached it), and the conversation as JSON (for
    scorers, evaluation and ``rlhf samples``)."""
    import json

    import numpy as np

    def relative(episode, index):
        return np.asarray([span[index] - episode.prompt_length for span in episode.turn_spans], dtype=np.int32)

    return {
        "policy_mask": [np.asarray(e.response_policy_mask, dtype=np.int8) for e in episodes],
        "turn_starts": [relative(e, 0) for e in episodes],
        "turn_ends": [relative(e, 1) for e in episodes],
        "turns": [e.turns for e in episodes],
        "tool_calls": [e.tool_calls for e in episodes],
        "parse_errors": [e.parse_errors for e in episodes],
        "limit": [e.limit or "" for e in episodes],
        "episode_reward": [e.reward for e in episodes],
        "turn_rewards": [json.dumps(e.turn_rewards) for e in episodes],
        "messages": [json.dumps(e.messages, ensure_ascii=False) for e in episodes],
    }


def episode_metrics(turns, tool_calls, parse_errors, limits, rewards) -> dict[str, float]:
    """Per-episode means: the environment's reward, turns, tool calls, unparsed tool calls, and the share of
    episodes that ended at a limit (any of LIMITS)."""
    count = max(len(turns), 1)
    return {"episode_reward": sum(rewards) / count, "turns_per_episode": sum(turns) / count,
            "tool_calls_per_episode": sum(tool_calls) / count, "parse_errors_per_episode": sum(parse_errors) / count,
            "limit_fraction": sum(1 for limit in limits if limit) / count}


def run_round_episodes(policy, tokenizer, params, prompt_rows: list[dict], *, max_new_tokens: int, generate_turn=None,
                       **sampling):
    """``run_episodes`` with the environment of ``params.environment`` (one new object per episode; ``auto`` resolved
    by ``Params.environment_kind``) and its limits, after checking that an episode's token budget fits the model's
    context (null: the context).  ``sampling``: samples_per_prompt, temperature, top_p, top_k, batch_size, seed,
    device, stop_ids; ``generate_turn``: as in ``run_episodes`` (None: HF generate)."""
    from rlhf_core.phases.rollout import context_length

    env = params.environment
    context = context_length(policy.config)
    if context is not None and (env.max_episode_tokens or 0) > context:
        raise DataError(f"environment.max_episode_tokens = {env.max_episode_tokens}: above the model's context of "
                        f"{context} tokens; lower it")
    budget = env.max_episode_tokens or context
    if budget is None:
        raise DataError("environment.max_episode_tokens is null and the model's config states no context length; set it")
    make = environments.environment_factory(params.environment_kind, env.class_path, env.kwargs)
    return run_episodes(policy, tokenizer, make, prompt_rows, max_new_tokens=max_new_tokens, max_turns=env.max_turns,
                        max_episode_tokens=budget, generate_turn=generate_turn, **sampling)


def sample_round_episodes(params, checkpoint, policy, engine, tokenizer, prompt_rows: list[dict], *, stop_ids: list[int],
                          seed: int, device):
    """The rollout stage's episodes of one round, from ``checkpoint``: policy turns by HF generate, or by the warm
    vLLM engine once it is proven to serve the checkpoint (``serve_round``'s probe, on the first prompt's text),
    token-in/token-out.  Returns (samples, the engine's metrics, episodes)."""
    ro = params.rollout
    sampling = dict(temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k)

    def run(generate_turn=None):
        return run_round_episodes(policy, tokenizer, params, prompt_rows, seed=seed, device=device, stop_ids=stop_ids,
                                  max_new_tokens=ro.max_new_tokens, samples_per_prompt=ro.samples_per_prompt,
                                  batch_size=ro.batch_size, generate_turn=generate_turn, **sampling)

    if engine is None:
        episodes = run()
        return episode_samples(episodes), {}, episodes
    from rlhf_core.phases.vllm_client import episode_turns, serve_round

    done = {}

    def on_engine(served_by):
        done["episodes"] = run(episode_turns(served_by, stop_ids=stop_ids, **sampling))
        return episode_samples(done["episodes"])

    probe = [tokenizer(str(prompt_rows[0]["prompt"]), add_special_tokens=False)["input_ids"] or [stop_ids[0]]]
    samples, served = serve_round(engine, params, checkpoint, policy, tokenizer, probe, seed=seed, stop_ids=stop_ids,
                                  device=device, generate=on_engine)
    return samples, served, done["episodes"]
