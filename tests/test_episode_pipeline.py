"""The stages' side of multi-turn episodes: the environment params and their one-line errors, advantages over the
policy's tokens only, the environment scorer and the scorers' episode metadata, the environment's fingerprint,
and the rollout table's episode columns."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rlhf_core.config import params_from_dict
from rlhf_core.errors import ConfigError, DataError
from rlhf_core.phases import environments
from rlhf_core.phases.episodes import Episode, episode_columns, episode_metrics, episode_samples, final_answer
from rlhf_core.rl.advantages import advantages_of_round, policy_tokens, round_advantages, spread_policy_tokens

EPISODE = {"environment": {"kind": "calculator"}, "algorithm": {"name": "grpo"}}


def test_policy_tokens_and_back_by_hand():
    arrays = [np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([7.0])]
    masks = [np.array([1, 1, 0, 0, 1], dtype=np.int8), np.array([1], dtype=np.int8)]
    kept = policy_tokens(arrays, masks)
    assert [a.tolist() for a in kept] == [[1.0, 2.0, 5.0], [7.0]]
    back = spread_policy_tokens([np.array([10.0, 20.0, 50.0]), np.array([70.0])], masks)
    assert [a.tolist() for a in back] == [[10.0, 20.0, 0.0, 0.0, 50.0], [70.0]]
    assert back[0].dtype == np.float32


def _round_tables(logprobs, values, masks, totals, groups):
    rollouts = pd.DataFrame({"prompt_index": groups, "logprobs": logprobs, "values": values,
                             "ended_with_eos": [True] * len(totals),
                             **({"policy_mask": masks} if masks is not None else {})})
    return rollouts, pd.DataFrame({"total": totals})


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_gae_and_group_advantages_skip_the_environments_tokens(algorithm):
    """An episode's advantages are those of the same policy tokens as one single-turn response with the
    environment's tokens cut out (GAE's next value is the next policy token's, never an observation's), and 0 on
    the environment's tokens.  By hand for GAE with γ = 1, λ = 0.5, no KL, score 1 on the last policy token:
    values (0.5, 0.25, 0.75) at the policy tokens give δ = (0.25−0.5, 0.75−0.25, 1−0.75) = (−0.25, 0.5, 0.25),
    A = (−0.25 + 0.5·0.5 + 0.25·0.25, 0.5 + 0.5·0.25, 0.25) = (0.0625, 0.625, 0.25)."""
    params = params_from_dict({"algorithm": {"name": algorithm}, "kl": {"reward_coef": 0.0},
                               "advantages": {"lam": 0.5, "whiten_advantages": False}, "ppo": {}})
    mask = np.array([1, 1, 0, 0, 0, 1], dtype=np.int8)
    values = np.array([0.5, 0.25, 9.0, 9.0, 9.0, 0.75], dtype=np.float32)
    logprobs = np.full(6, -1.0, dtype=np.float32)
    episode = _round_tables([logprobs, logprobs], [values, values], [mask, mask], [1.0, 0.0], [0, 0])
    cut = _round_tables([logprobs[mask == 1]] * 2, [values[mask == 1]] * 2, None, [1.0, 0.0], [0, 0])
    with_env, _, _ = advantages_of_round(params, *episode, {}, seed=0)
    single, _, _ = advantages_of_round(params, *cut, {}, seed=0)
    for name in ("advantages", "returns", "rewards"):
        for row in range(2):
            np.testing.assert_array_equal(with_env[name][row][mask == 1], single[name][row])
            assert (with_env[name][row][mask == 0] == 0).all()
    if algorithm == "ppo":
        np.testing.assert_allclose(with_env["advantages"][0][mask == 1], [0.0625, 0.625, 0.25], rtol=1e-6)


def test_round_advantages_without_mask_is_unchanged():
    """The single-turn path does not go through the policy-token cut (a table without policy_mask)."""
    arrays, _ = round_advantages([np.zeros(3)], None, [np.zeros(3)], [1.0], kl_coef=0.0, kl_estimator="k1",
                                 gamma=1.0, lam=1.0, whiten_rewards=False, whiten_advantages=False)
    assert arrays["advantages"][0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("changes, message", [
    ({"environment": {"max_turns": 2}}, r"^environment.max_turns = 2: read only with an environment"),
    ({"score": {"scorers": [{"name": "e", "kind": "environment"}]}},
     r"^score.scorers: a scorer of kind environment needs environment.kind"),
    ({**EPISODE, "environment": {"kind": "python"}}, r"^environment.class_path = '': kind python needs `module:Class`"),
    ({**EPISODE, "environment": {"kind": "calculator", "class_path": "a:B"}},
     r"^environment.class_path = 'a:B': read only with kind python"),
    ({**EPISODE, "rollout": {"engine": "vllm", "record_sampler_logprobs": True}},
     r"^rollout.record_sampler_logprobs = True: episodes .* record no sampler log-probs yet"),
    # the episodes' refusal comes first: "set record_sampler_logprobs: true" would send the user to the line above
    ({**EPISODE, "rollout": {"engine": "vllm"}, "rollout_correction": {"mode": "tis"}},
     r"^rollout_correction.mode = 'tis': episodes .* record no sampler log-probs yet"),
    ({**EPISODE, "compute": {"num_processes": 2}}, r"^compute.rollout_processes: episodes run in one rollout process"),
    ({**EPISODE, "chat": {"system_prompt": "Be brief."}}, r"^chat.system_prompt = 'Be brief.': with an environment"),
    ({**EPISODE, "chat": {"template": "off"}}, r"^chat.template = 'off': with an environment"),
    ({**EPISODE, "algorithm": {"name": "ppo", "critic_warmup_epochs": 1}},
     r"^algorithm.critic_warmup_epochs = 1: not supported with an environment"),
])
def test_environment_params_are_checked_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message):
        params_from_dict(changes)


def test_environment_params_that_work():
    params = params_from_dict({"environment": {"kind": "python", "class_path": "my_env:Game", "kwargs": {"size": 3}},
                               "compute": {"num_processes": 2, "rollout_processes": 1},
                               "score": {"scorers": [{"name": "game", "kind": "environment"}]}})
    assert params.multi_turn and params.environment.kwargs == {"size": 3}
    on_vllm = params_from_dict({**EPISODE, "rollout": {"engine": "vllm"}})
    assert not on_vllm.records_sampler_logprobs and on_vllm.sampler_correction == "none"
    assert not params_from_dict({}).multi_turn


def test_the_environment_factory_makes_new_objects_and_names_a_broken_constructor(tmp_path, monkeypatch):
    make = environments.environment_factory("calculator", "", {"system_prompt": "Compute."})
    first, second = make(), make()
    assert first is not second and first.system_prompt == "Compute."
    with pytest.raises(DataError, match=r"^environment calculator: its constructor raised TypeError: .*unexpected"):
        environments.environment_factory("calculator", "", {"colour": "red"})
    (tmp_path / "broken_env.py").write_text("class Game:\n    def __init__(self):\n        raise RuntimeError('no board')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DataError, match=r"^environment broken_env:Game: its constructor raised RuntimeError: no board"):
        environments.environment_factory("python", "broken_env:Game", {})


def test_the_environment_fingerprint_follows_its_source(tmp_path, monkeypatch):
    from rlhf_core.tooling.fingerprints import environment_inputs

    (tmp_path / "game_env.py").write_text("from game_rules import RULES\nclass Game:\n    pass\n")
    (tmp_path / "game_rules.py").write_text("RULES = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    params = params_from_dict({"environment": {"kind": "python", "class_path": "game_env:Game"}})
    before = environment_inputs(params.environment)
    assert set(before["files"]) == {"game_env.py", "game_rules.py"}
    (tmp_path / "game_rules.py").write_text("RULES = 2\n")
    assert environment_inputs(params.environment) != before
    assert environment_inputs(params_from_dict({}).environment) == {}
    missing = params_from_dict({"environment": {"kind": "python", "class_path": "no_such_env:Game"}})
    with pytest.raises(DataError, match=r"^environment module 'no_such_env' is not a Python source file|^environment "
                                        r"module 'no_such_env' cannot be found"):
        environment_inputs(missing.environment)


def _episode(prompt_index=0, limit=None) -> Episode:
    # prompt of 3 tokens; policy turn (4, 5); observation (6, 7); policy turn (8,)
    return Episode(prompt_index, 0, [1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 1, 1, 0, 0, 1], 3,
                   turn_spans=[(3, 5), (7, 8)],
                   messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
                             {"role": "tool", "content": "42"}, {"role": "assistant", "content": "a2"}],
                   turn_rewards=[None, 1.0], tool_calls=1, limit=limit, reward=1.0, done=True)


def test_episode_columns_samples_and_metrics():
    episodes = [_episode(), _episode(1, limit="max_turns")]
    samples = episode_samples(episodes)
    assert samples[0].prompt_ids == [1, 2, 3] and samples[0].response_ids == [4, 5, 6, 7, 8]
    assert [s.ended_with_eos for s in samples] == [True, False]
    columns = episode_columns(episodes)
    assert columns["policy_mask"][0].tolist() == [1, 1, 0, 0, 1]
    assert columns["turn_starts"][0].tolist() == [0, 4] and columns["turn_ends"][0].tolist() == [2, 5]
    assert columns["limit"] == ["", "max_turns"] and json.loads(columns["messages"][0])[2]["content"] == "42"
    assert json.loads(columns["turn_rewards"][0]) == [None, 1.0]
    assert final_answer(episodes[0]) == "a2"
    metrics = episode_metrics([2, 3], [1, 0], [0, 1], ["", "max_turns"], [1.0, 0.0])
    assert metrics == {"episode_reward": 0.5, "turns_per_episode": 2.5, "tool_calls_per_episode": 0.5,
                       "parse_errors_per_episode": 0.5, "limit_fraction": 0.5}


def test_scorers_read_the_episode():
    from rlhf_core.phases.rewards import row_metadata, score_responses

    table = pd.DataFrame(episode_columns([_episode(), _episode(1)])).assign(answer=["42", "7"])
    metadata = row_metadata(table)
    assert metadata[0]["messages"][2] == {"role": "tool", "content": "42"} and metadata[1]["answer"] == "7"
    params = params_from_dict({**EPISODE, "score": {"scorers": [{"name": "env", "kind": "environment"}]}})
    components, _ = score_responses(params.score.scorers, prompts=["q", "q"], responses=["a2", "a2"], lengths=[5, 5],
                                    ended=[True, True], metadata=metadata, missing_eos_penalty=0.0, task="arithmetic")
    assert components["env"] == [1.0, 1.0]
    with pytest.raises(DataError, match=r"^scorer env: the responses are not episodes"):
        score_responses(params.score.scorers, prompts=["q"], responses=["a"], lengths=[1], ended=[True],
                        metadata=[{}], missing_eos_penalty=0.0, task="arithmetic")


def test_policy_token_counts_do_not_wrap():
    """The rollout table stores policy_mask as int8; the trained-token count (the loss's denominator) must not wrap
    at 127 as numpy's int8 sum() would (it did: a negative count flipped the loss's sign)."""
    from rlhf_core.rl.algorithms.common import Experience

    masks = [np.ones(300, dtype=np.int8), np.array([1, 0, 1], dtype=np.int8)]
    experience = Experience([[1]] * 2, [list(range(300)), [1, 2, 3]], [np.zeros(300), np.zeros(3)], None,
                            [np.zeros(300), np.zeros(3)], [np.zeros(300), np.zeros(3)], [np.zeros(300), np.zeros(3)],
                            policy_mask=masks)
    assert experience.tokens([0, 1]) == 302
