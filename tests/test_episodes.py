"""Multi-turn episodes, token-in/token-out (rlhf_core/phases/episodes.py), and the environment interface and
its one-line errors (rlhf_core/phases/environments.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.errors import DataError
from rlhf_core.phases import environments
from rlhf_core.phases.environments import Calculator, evaluate_arithmetic, final_answer, parse_tool_calls
from rlhf_core.phases.episodes import check_template, run_episodes
from rlhf_core.tooling.local_models import CHATML_TEMPLATE, end_ids, write_local_model

CPU = torch.device("cpu")
# ChatML that renders tools the way Qwen2.5's template does: into the system turn
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% endif %}{{ '\\n# Tools\\n<tools>' }}{% for tool in tools %}{{ tool | tojson }}{% endfor %}"
    "{{ '</tools><|im_end|>\\n' }}{% endif %}{% for message in messages %}"
    "{% if not (tools and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A chat-templated model with SmolLM2's 49,152-token vocabulary, pad == eos as shipped, built locally."""
    from rlhf_core.model.loading import load_causal_lm, load_tokenizer

    directory = write_local_model(tmp_path_factory.mktemp("chat49k") / "model", "chatml-49k-tiny")
    tokenizer = load_tokenizer(str(directory))
    assert len(tokenizer) == 49152
    return load_causal_lm(str(directory), CPU), tokenizer


class RecordingPolicy:
    """The real model's generate, recording every call's unpadded input rows and new ids; after ``turn_length``
    new tokens it makes the end of turn certain (a random tiny model rarely stops by itself)."""

    def __init__(self, model, stop_id: int, turn_length: int = 4):
        self.model, self.stop_id, self.turn_length, self.calls = model, stop_id, turn_length, []

    @property
    def generation_config(self):
        return self.model.generation_config

    @generation_config.setter
    def generation_config(self, value):
        self.model.generation_config = value

    def generate(self, input_ids, attention_mask, generation_config):
        from transformers import LogitsProcessorList

        width = input_ids.shape[1]

        def end_turn(ids, scores):
            if ids.shape[1] - width >= self.turn_length:
                scores = torch.full_like(scores, -math.inf)
                scores[:, self.stop_id] = 0.0
            return scores

        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     generation_config=generation_config,
                                     logits_processor=LogitsProcessorList([end_turn]))
        for row in range(input_ids.shape[0]):
            self.calls.append((input_ids[row][attention_mask[row].bool()].tolist(), output[row, width:].tolist()))
        return output


class Scripted:
    """Answers every policy turn with an observation until the fourth turn, then ends."""

    tools = None

    def __init__(self):
        self.turns = 0

    def reset(self, prompt_row):
        return [{"role": "user", "content": prompt_row["prompt"]}]

    def step(self, assistant_message):
        self.turns += 1
        if self.turns == 4:
            return [], 1.0, True
        return [{"role": "user", "content": f"observation {self.turns}: 12 + 30 = 42"}], None, False

    def score(self, episode):
        return float(episode["turns"])


def test_the_ids_trained_on_are_the_ids_sampled_through_four_turns(chat_model):
    """Token-in/token-out on a 49k-vocabulary chat model: every turn is generated from the stored stream, and every
    stored policy token is the sampled one, byte for byte; observations are context with policy_mask 0."""
    model, tokenizer = chat_model
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    policy = RecordingPolicy(model, stop)
    rows = [{"prompt": "a good movie"}, {"prompt": "the plot was"}]
    episodes = run_episodes(policy, tokenizer, Scripted, rows, samples_per_prompt=2, temperature=1.0, top_p=1.0,
                            top_k=0, max_new_tokens=16, max_turns=6, max_episode_tokens=400, batch_size=8, seed=0,
                            device=CPU, stop_ids=end_ids("chatml", tokenizer))
    assert [e.turns for e in episodes] == [4, 4, 4, 4] and all(e.limit is None and e.done for e in episodes)
    assert [e.reward for e in episodes] == [4.0] * 4 and all(e.turn_rewards[-1] == 1.0 for e in episodes)
    unmatched = {(id(e), s) for e in episodes for s in e.turn_spans}  # every policy turn of every episode
    for given, sampled in policy.calls:  # each generate row: the stream it was given, the ids it sampled
        turn = sampled[:sampled.index(stop) + 1] if stop in sampled else sampled
        found = [(id(e), s) for e in episodes for s in e.turn_spans
                 if e.token_ids[:s[0]] == given and e.token_ids[s[0]:s[1]] == turn and (id(e), s) in unmatched]
        assert found, "a sampled turn is not stored as sampled after the stream it was generated from"
        unmatched.discard(found[0])
    assert not unmatched and len(policy.calls) == 16
    for episode in episodes:
        assert len(episode.policy_mask) == len(episode.token_ids)
        policy_positions = {i for start, end in episode.turn_spans for i in range(start, end)}
        assert {i for i, m in enumerate(episode.policy_mask) if m} == policy_positions
        last_end = episode.turn_spans[-1][1]
        assert last_end == len(episode.token_ids)  # it ended on a policy turn
        observations = [tokenizer.decode(episode.token_ids[a[1]:b[0]]) for a, b in zip(episode.turn_spans,
                                                                                       episode.turn_spans[1:])]
        assert observations == [f"\n<|im_start|>user\nobservation {k}: 12 + 30 = 42<|im_end|>\n<|im_start|>assistant\n"
                                for k in (1, 2, 3)]
        assert [m["role"] for m in episode.messages] == ["user"] + ["assistant", "user"] * 3 + ["assistant"]


class ScriptedTokens:
    """A policy whose every turn is given text (tokenized by the test): to drive the calculator deterministically."""

    def __init__(self, tokenizer, turns: list[str]):
        self.tokenizer, self.turns, self.generation_config, self.index = tokenizer, turns, None, 0

    def generate(self, input_ids, attention_mask, generation_config):
        ids = self.tokenizer(self.turns[self.index] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        self.index += 1
        new = torch.tensor([ids] * input_ids.shape[0])
        return torch.cat([input_ids, new], dim=1)


def test_the_calculator_runs_a_tool_call_then_scores_the_answer(chat_model):
    _, tokenizer = chat_model
    tokenizer = _with_template(tokenizer, TOOLS_TEMPLATE)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "37 * 46 + 12"}}</tool_call>'
    policy = ScriptedTokens(tokenizer, [call, "<tool_call>{not json</tool_call>", "The answer is 1714"])
    episodes = run_episodes(policy, tokenizer, Calculator, [{"prompt": "What is 37 * 46 + 12?", "answer": 1714}],
                            samples_per_prompt=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256,
                            max_turns=4, max_episode_tokens=2000, batch_size=4, seed=0, device=CPU,
                            stop_ids=end_ids("chatml", tokenizer))
    (episode,) = episodes
    assert (episode.turns, episode.tool_calls, episode.parse_errors, episode.limit, episode.reward) == (3, 1, 1, None, 1.0)
    assert [m["content"] for m in episode.messages if m["role"] == "tool"][0] == "1714"
    assert "the tool call did not parse" in [m["content"] for m in episode.messages if m["role"] == "tool"][1]
    assert '"name": "calculator"' in tokenizer.decode(episode.token_ids[:episode.prompt_length])  # tools rendered


def _with_template(tokenizer, template: str):
    import copy

    clone = copy.deepcopy(tokenizer)
    clone.chat_template = template
    return clone


def test_limits_end_an_episode_and_are_recorded(chat_model):
    model, tokenizer = chat_model
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")

    class NeverDone(Scripted):
        def step(self, assistant_message):
            return [{"role": "user", "content": "go on"}], None, False

    common = dict(samples_per_prompt=1, temperature=1.0, top_p=1.0, top_k=0, batch_size=4, seed=0, device=CPU,
                  stop_ids=end_ids("chatml", tokenizer))
    (capped,) = run_episodes(RecordingPolicy(model, stop), tokenizer, NeverDone, [{"prompt": "hi"}], max_new_tokens=8,
                             max_turns=3, max_episode_tokens=400, **common)
    assert (capped.turns, capped.limit, capped.reward) == (3, "max_turns", 3.0)
    (budget,) = run_episodes(RecordingPolicy(model, stop, turn_length=30), tokenizer, NeverDone, [{"prompt": "hi"}],
                             max_new_tokens=40, max_turns=5, max_episode_tokens=30, **common)
    assert budget.limit == "max_episode_tokens" and len(budget.token_ids) == 30
    (long_turn,) = run_episodes(RecordingPolicy(model, stop, turn_length=30), tokenizer, NeverDone, [{"prompt": "hi"}],
                                max_new_tokens=5, max_turns=5, max_episode_tokens=400, **common)
    assert (long_turn.turns, long_turn.limit) == (1, "max_new_tokens")


class Broken(Scripted):
    def __init__(self, reply):
        super().__init__()
        self.reply = reply

    def step(self, assistant_message):
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


@pytest.mark.parametrize(("reply", "message"), [
    (KeyError("answer"), "environment Broken.step raised KeyError: 'answer'"),
    ("text", "environment Broken.step: must return (messages, reward, done) or (messages, reward, done, info)"),
    (({"role": "user", "content": "x"}, None, False), "environment Broken.step: must return a list of messages"),
    (([{"role": "robot", "content": "x"}], None, False), "environment Broken.step: message 0 must be a dict with role"),
    (([], "1", True), "environment Broken.step: the reward must be a finite number or None, got '1'"),
    (([], float("nan"), True), "environment Broken.step: the reward must be a finite number or None, got nan"),
    (([], None, "yes"), "environment Broken.step: done must be true or false, got 'yes'"),
    (([], None, False), "environment Broken.step: the episode goes on (done is false) but no new message"),
    (([], None, True, {"tool_calls": "2"}), "environment Broken.step: info must be a dict whose tool_calls"),
])
def test_a_broken_environment_is_one_line(reply, message):
    with pytest.raises(DataError) as info:
        environments.step(Broken(reply), {"role": "assistant", "content": "hi"})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_reset_score_and_tools_are_checked_too():
    class BadReset(Scripted):
        def reset(self, prompt_row):
            return prompt_row["missing"]

    with pytest.raises(DataError, match=r"^environment BadReset.reset raised KeyError: 'missing'$"):
        environments.reset(BadReset(), {})

    class NaNScore(Scripted):
        def score(self, episode):
            return float("nan")

    with pytest.raises(DataError, match=r"^environment NaNScore.score: must return a finite number, got nan$"):
        environments.score(NaNScore(), {})

    class BadTools(Scripted):
        tools = "calculator"

    with pytest.raises(DataError, match=r"^environment BadTools.tools: must be a list of JSON-schema function specs"):
        environments.tools_of(BadTools())
    with pytest.raises(DataError, match=r"^environment 'nope': must be module:Class$"):
        environments.load_environment_class("nope")
    with pytest.raises(DataError, match=r"^environment 'no_such_module:Env': cannot import 'no_such_module'"):
        environments.load_environment_class("no_such_module:Env")
    assert environments.load_environment_class("rlhf_core.phases.environments:Calculator") is Calculator


def test_tools_need_a_template_that_renders_them(chat_model):
    _, tokenizer = chat_model
    assert tokenizer.chat_template == CHATML_TEMPLATE
    with pytest.raises(DataError, match=r"^the environment has tools, but the policy's chat template does not render "
                                        r"them"):
        check_template(tokenizer, Calculator.tools)
    check_template(_with_template(tokenizer, TOOLS_TEMPLATE), Calculator.tools)
    check_template(tokenizer, None)


def test_calculator_parsing_by_hand():
    assert evaluate_arithmetic("37 * 46 + 12") == 1714 and evaluate_arithmetic("-(3 - 5) * 2") == 4
    for bad in ("__import__('os')", "2 ** 100", "1 / 2", "x + 1", "1 +"):
        with pytest.raises(ValueError):
            evaluate_arithmetic(bad)
    good = '<tool_call>{"name": "calculator", "arguments": {"expression": "1 + 2"}}</tool_call>'
    assert parse_tool_calls(good + " and " + good) == (["1 + 2", "1 + 2"], 0)
    assert parse_tool_calls('<tool_call>{"name": "search", "arguments": {}}</tool_call>') == ([], 1)
    assert parse_tool_calls("<tool_call>{\"name\": \"calculator\"") == ([], 1)  # never closed
    assert parse_tool_calls("no call") == ([], 0)
    assert final_answer("so 12 + 30 is 42.") == "42" and final_answer(good + " no number") is None
    env = Calculator()
    assert env.reset({"prompt": "What is 2 * 3?", "answer": 6}) == [{"role": "user", "content": "What is 2 * 3?"}]
    assert Calculator("Be exact.").reset({"prompt": "q", "answer": 1})[0] == {"role": "system", "content": "Be exact."}
    assert env.step({"role": "assistant", "content": "It is 6"}) == ([], 1.0, True, {"tool_calls": 0, "parse_errors": 0})
    assert env.score({}) == 1.0


def _episode_experience(chat_model, tmp_path):
    """Four 4-turn episodes of the chat model as a round's Experience: old log-probs and values recorded by the
    training forward pass, and a group-relative advantage per episode on every policy token."""
    from rlhf_core.model.checkpoints import load_actor_critic
    from rlhf_core.phases.episodes import episode_samples
    from rlhf_core.phases.rollout import record_token_stats
    from rlhf_core.rl.algorithms.common import Experience

    model, tokenizer = chat_model
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    actor_critic = load_actor_critic(str(tmp_path / "policy"), "value_head", CPU)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")

    episodes = run_episodes(RecordingPolicy(actor_critic.policy, stop), tokenizer, Scripted,
                            [{"prompt": "a good movie"}, {"prompt": "the plot was"}], samples_per_prompt=2,
                            temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16, max_turns=6,
                            max_episode_tokens=400, batch_size=8, seed=3, device=CPU,
                            stop_ids=end_ids("chatml", tokenizer))
    samples = episode_samples(episodes)
    masks = [e.response_policy_mask for e in episodes]
    stats = record_token_stats(actor_critic, None, samples, pad_id=tokenizer.pad_token_id, temperature=1.0,
                               batch_size=8, device=CPU, reference_is_policy=True)
    # the episodes' group-relative advantages, as if their rewards had been 2, 0, 1.5 and 0.5
    advantages = [[value * m for m in mask] for value, mask in zip((1.0, -1.0, 0.5, -0.5), masks)]
    experience = Experience([s.prompt_ids for s in samples], [s.response_ids for s in samples], stats["logprobs"],
                            None, stats["values"], advantages, [[0.0] * len(a) for a in advantages],
                            policy_mask=masks)
    return actor_critic, tokenizer, experience


def test_environment_tokens_get_no_gradient_and_the_first_ratio_is_one(chat_model, tmp_path):
    """The loss over episodes: whatever advantage the environment's tokens carry, the gradient is the same, while
    the policy's tokens' advantages change it; and on the unchanged policy the first PPO ratio is exactly 1."""
    import copy

    from rlhf_core.config import params_from_dict
    from rlhf_core.rl.algorithms.ppo import ppo_loss, train_ppo

    actor_critic, tokenizer, experience = _episode_experience(chat_model, tmp_path)
    params = params_from_dict({"device": "cpu", "algorithm": {"name": "grpo"},
                               "optim": {"epochs": 1, "minibatch_size": 4, "micro_batch_size": 4}})
    rows = list(range(len(experience)))

    def gradient(advantages, policy_mask):
        changed = copy.copy(experience)
        changed.advantages, changed.policy_mask = advantages, policy_mask
        micro = changed.micro_batch(rows, tokenizer.pad_token_id, CPU)
        actor_critic.zero_grad(set_to_none=True)
        out = actor_critic(micro.batch, 1.0, with_values=True)
        loss, _ = ppo_loss(out, micro, {"tokens": float(changed.tokens(rows)), "sequences": 4.0}, params,
                           use_critic=False)
        loss.backward()
        return actor_critic.policy.get_input_embeddings().weight.grad.clone()

    on_environment = [[a if m else 1000.0 for a, m in zip(row, mask)]
                      for row, mask in zip(experience.advantages, experience.policy_mask)]
    on_policy = [[a + 1.0 if m else a for a, m in zip(row, mask)]
                 for row, mask in zip(experience.advantages, experience.policy_mask)]
    base = gradient(experience.advantages, experience.policy_mask)
    assert base.abs().sum() > 0
    assert torch.equal(gradient(on_environment, experience.policy_mask), base)  # environment tokens: no gradient
    assert not torch.equal(gradient(on_policy, experience.policy_mask), base)  # policy tokens: they count
    assert not torch.equal(gradient(on_environment, None), base)  # without the mask they would train
    assert experience.tokens(rows) == sum(map(sum, experience.policy_mask)) < sum(map(len, experience.response_ids))
    metrics = train_ppo(actor_critic, experience, params, temperature=1.0, pad_id=tokenizer.pad_token_id, device=CPU,
                        seed=0, log=lambda *_: None, use_critic=False)
    assert metrics["first_minibatch_ratio_max_deviation"] == 0.0 and metrics["optimizer_steps"] == 1


# trpo and npg take about 18 s each here (Fisher-vector products over a 49k vocabulary): with the end-to-end tests
@pytest.mark.parametrize("algorithm", ["ppo", "a2c", "reinforce", "rloo", "cispo", "reinforce_pp",
                                       pytest.param("trpo", marks=pytest.mark.e2e),
                                       pytest.param("npg", marks=pytest.mark.e2e)])
def test_every_algorithm_trains_on_the_policys_tokens_only(chat_model, tmp_path, algorithm):
    """A whole round of each algorithm's update on episodes: advantages, returns and old values of 1000 on the
    environment's tokens leave the updated weights bit for bit as they were, the critic's (value loss) included;
    on the policy's tokens the same change moves them."""
    import copy

    from rlhf_core.config import params_from_dict
    from rlhf_core.rl.algorithms.train import train_round

    actor_critic, tokenizer, experience = _episode_experience(chat_model, tmp_path)
    experience.returns = [[0.5 * m for m in mask] for mask in experience.policy_mask]
    trust_region = {"trpo": {"cg_iters": 1, "max_backtracks": 1, "critic_epochs": 1}} if algorithm in ("trpo", "npg") else {}
    params = params_from_dict({"device": "cpu", "algorithm": {"name": algorithm},
                               "optim": {"epochs": 1, "minibatch_size": 4, "micro_batch_size": 2}, **trust_region})

    def trained(where_changed):
        changed = copy.copy(experience)
        for name in ("advantages", "returns", "old_values"):
            setattr(changed, name, [[1000.0 if where_changed(m) else v for v, m in zip(row, mask)]
                                    for row, mask in zip(getattr(experience, name), experience.policy_mask)])
        model = copy.deepcopy(actor_critic)
        train_round(model, changed, params, temperature=1.0, pad_id=tokenizer.pad_token_id, device=CPU, seed=0,
                    log=lambda *_: None)
        return model.state_dict()

    def unchanged(m):
        return False

    base = trained(unchanged)
    on_environment = trained(lambda m: m == 0)
    assert all(torch.equal(base[name], on_environment[name]) for name in base)
    on_policy = trained(lambda m: m == 1)
    assert not all(torch.equal(base[name], on_policy[name]) for name in base)
