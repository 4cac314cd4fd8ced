"""The built-in calculator task: its prompts and episode demonstrations, the tiny model's chat tokenizer with
tool support, demonstrations encoded as the ids a rollout holds, and the params that select it."""

from __future__ import annotations

import json

import pytest

from rlhf_core.config import params_from_dict
from rlhf_core.errors import ConfigError
from rlhf_core.phases.environments import Calculator, parse_tool_calls
from rlhf_core.phases.tasks import calculator, get_task


@pytest.fixture(scope="module")
def chat_tokenizer():
    from rlhf_core.model.loading import train_tokenizer
    from rlhf_core.phases.sft import builtin_tokenizer_corpus

    return train_tokenizer(*builtin_tokenizer_corpus("calculator", calculator.demonstrations(600, 0), 500))


def test_prompts_and_demonstrations_by_hand():
    assert get_task("calculator") is calculator and calculator.HAS_ANSWERS
    assert calculator.question(47, 8) == "What is 47 * 8?"
    assert calculator.slips(47, 8) == [329, 423, 368, 384, 366, 386]
    assert calculator.prompts(3, 0) == calculator.prompts(3, 0)
    for row in calculator.prompts(50, 1):
        a, b = (int(x) for x in row["prompt"][len("What is "):-1].split(" * "))
        assert row["answer"] == str(a * b)
    demos = calculator.demonstrations(2000, 0)
    used = [row for row in demos if row["used_tool"]]
    assert 0.45 < len(used) / len(demos) < 0.55  # TOOL_FRACTION
    for row in used[:20]:  # the tool call parses, and the calculator's result is the final answer
        messages = json.loads(row["messages"])
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
        expressions, errors = parse_tool_calls(messages[1]["content"])
        environment = Calculator()
        environment.reset({"prompt": row["prompt"], "answer": row["answer"]})
        observation, _, done, info = environment.step(messages[1])
        assert errors == 0 and not done and info["tool_calls"] == 1 and observation[0]["content"] == row["answer"]
        assert messages[3]["content"] == row["response"] == row["answer"]
    direct = [row for row in demos if not row["used_tool"]]
    right = sum(row["response"] == row["answer"] for row in direct) / len(direct)
    assert 0.05 < right < 0.15  # GUESS_RIGHT


def test_the_chat_tokenizer_renders_tools_and_keeps_tool_call_tokens(chat_tokenizer):
    from rlhf_core.phases.episodes import check_template

    tokenizer = chat_tokenizer
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    check_template(tokenizer, Calculator.tools)  # renders the tools: "[calculator]" on the system turn
    call = calculator.tool_call("47 * 8")
    ids = tokenizer(call, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<tool_call>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == call  # the environment still sees the markers


def test_the_environment_reads_tool_markers_that_are_special_tokens(chat_tokenizer):
    """Some chat models make ``<tool_call>`` a special token; decoding a turn without special tokens would hide the
    call from the environment.  assistant_text keeps them and drops only BOS, EOS and pad."""
    import copy

    from rlhf_core.phases.episodes import assistant_text

    special = copy.deepcopy(chat_tokenizer)
    special.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    call = calculator.tool_call("47 * 8")
    ids = special(call, add_special_tokens=False)["input_ids"]
    assert special.decode(ids, skip_special_tokens=True) != call  # the quirk
    assert assistant_text(special, [special.pad_token_id, *ids, special.eos_token_id]) == call
    assert parse_tool_calls(assistant_text(special, ids)) == (["47 * 8"], 0)
    assert assistant_text(chat_tokenizer, ids) == call  # the calculator's own tokenizer: non-special markers


def test_a_demonstration_is_encoded_as_the_ids_a_rollout_holds(chat_tokenizer):
    """encode_episode's ids equal those run_episodes builds turn by turn: the prompt rendered once, each assistant
    turn's ids with its end of turn, and each observation as ``observation_text`` tokenized once."""
    from rlhf_core.phases.episodes import observation_text, render
    from rlhf_core.phases.sft import encode_episode

    tokenizer = chat_tokenizer
    row = next(row for row in calculator.demonstrations(50, 3) if row["used_tool"])
    messages, tools = json.loads(row["messages"]), Calculator.tools
    prompt, response = encode_episode(tokenizer, row["messages"], row["tools"], 200)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    assert prompt == ids(render(tokenizer, messages[:1], tools, generation_prompt=True))
    turn = ids(messages[1]["content"]) + [eos]
    glue = observation_text(tokenizer, messages[:1], messages[1], [messages[2]], tools, tokenizer.decode(turn),
                            tokenizer.decode([eos]))
    assert response == turn + ids(glue) + ids(messages[3]["content"]) + [eos]
    assert all(len(tokenizer.decode([token])) == 1 for token in ids("1702"))  # one token per digit
    short_prompt, short_response = encode_episode(tokenizer, row["messages"], row["tools"], 40)
    assert len(short_prompt) + len(short_response) <= 40


def test_task_calculator_selects_the_calculator_environment():
    params = params_from_dict({"task": "calculator"})
    assert params.environment.kind == "auto" and params.environment_kind == "calculator" and params.multi_turn
    assert params_from_dict({}).environment_kind == "none"
    with pytest.raises(ConfigError, match=r"^environment.kind = 'none': task calculator is a tool task"):
        params_from_dict({"task": "calculator", "environment": {"kind": "none"}})
