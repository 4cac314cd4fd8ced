"""Unit tests of the built-in arithmetic task, its answers through the data path and the params, and
the exact-match metric of the evaluation."""

from __future__ import annotations

import re

import pytest

from rlhf_core.config import TASKS, params_from_dict, replace
from rlhf_core.errors import ConfigError, DataError
from rlhf_core.phases.data import prepare_prompts, read_prompt_records
from rlhf_core.phases.evaluation import exact_match
from rlhf_core.phases.tasks import arithmetic, get_task

PROMPT = re.compile(r"^(\d) (\d) \+ (\d) (\d) =$")


def operands(prompt: str) -> tuple[int, int]:
    """23 and 14 from "2 3 + 1 4 =", parsed independently of the task module."""
    match = PROMPT.match(prompt)
    assert match, prompt
    a1, a0, b1, b0 = (int(d) for d in match.groups())
    return 10 * a1 + a0, 10 * b1 + b0


# -- the task ----------------------------------------------------------------------------------------

def test_get_task_arithmetic():
    assert "arithmetic" in TASKS
    assert get_task("arithmetic") is arithmetic
    assert arithmetic.HAS_ANSWERS is True


def test_every_task_params_allow_is_a_built_in_task():
    """config.TASKS (the `task` Literal) is the one list of tasks: get_task knows each of them, and nothing else."""
    assert [get_task(name).__name__ for name in TASKS] == [f"rlhf_core.phases.tasks.{name}" for name in TASKS]
    with pytest.raises(ConfigError, match="task = 'poetry': not a built-in task"):
        get_task("poetry")


def test_arithmetic_formats_by_hand():
    assert arithmetic.format_prompt(23, 14) == "2 3 + 1 4 ="
    assert arithmetic.answer(23, 14) == "3 7"
    assert arithmetic.format_response(37) == " 3 7"
    assert arithmetic.mistakes(23, 14) == [27, 36, 38, 47]
    assert operands("2 3 + 1 4 =") == (23, 14)
    # tens pairs 1..4 x 1..4 (16) times units pairs with a sum <= 9 (10 + 9 + ... + 1 = 55)
    assert len(arithmetic.PROBLEMS) == 16 * 55 == 880
    assert (23, 14) in arithmetic.PROBLEMS and (17, 25) not in arithmetic.PROBLEMS  # 7 + 5 carries


def test_arithmetic_prompts_are_deterministic_per_seed_with_correct_answers():
    rows = arithmetic.prompts(500, seed=3)
    assert len(rows) == 500
    assert rows == arithmetic.prompts(500, seed=3)
    assert rows != arithmetic.prompts(500, seed=4)
    for row in rows:
        assert set(row) == {"prompt", "answer"}
        a, b = operands(row["prompt"])
        assert 10 <= a <= 49 and 10 <= b <= 49
        assert a % 10 + b % 10 <= 9  # no carry
        assert row["answer"].replace(" ", "") == str(a + b)
        assert row["answer"] == " ".join(str(a + b))
    assert len({row["prompt"] for row in rows}) > 300  # duplicates possible, but mostly distinct


def test_arithmetic_demonstrations_are_correct_the_documented_fraction_of_the_time():
    rows = arithmetic.demonstrations(4000, seed=0)
    assert rows == arithmetic.demonstrations(4000, seed=0)
    assert rows != arithmetic.demonstrations(4000, seed=1)
    assert arithmetic.CORRECT_FRACTION == 0.5 and arithmetic.SLIP == 10
    correct = 0
    for row in rows:
        a, b = operands(row["prompt"])
        assert row["response"].startswith(" ") and row["answer"] == " ".join(str(a + b))
        value = int(row["response"].replace(" ", ""))
        if value == a + b:
            correct += 1
            assert row["correct"] is True
        else:
            assert value == a + b + 10 and row["correct"] is False  # the slip: a spurious carry
    # binomial standard deviation sqrt(0.25 / 4000) = 0.008; the tolerance is about 4 of them
    assert abs(correct / len(rows) - arithmetic.CORRECT_FRACTION) < 0.03


def test_arithmetic_preferences_choose_the_right_sum():
    rows = arithmetic.preferences(300, seed=0)
    assert rows == arithmetic.preferences(300, seed=0)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        a, b = operands(row["prompt"])
        assert row["chosen"] == " " + " ".join(str(a + b))
        assert row["rejected"] != row["chosen"] and row["rejected"].startswith(" ")
        wrong = int(row["rejected"].replace(" ", ""))
        assert wrong in (a + b - 10, a + b - 1, a + b + 1, a + b + 10)


def test_arithmetic_reward_is_exact_match():
    responses = [" 42", "42", " 41", " 42 3", "", "4 2"]
    assert arithmetic.reward(["x"] * 6, responses, [{"answer": "42"}] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    spaced = [" 4 2", "4 2", " 4 1", " 4 2 3", "", "42", " 4 2 "]
    assert arithmetic.reward(["x"] * 7, spaced, [{"answer": "4 2"}] * 7) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_arithmetic_reward_without_answers_raises():
    with pytest.raises(DataError, match="reference answer"):
        arithmetic.reward(["2 3 + 1 4 ="], [" 3 7"], [{}])


def test_the_builtin_tokenizer_reads_one_digit_per_token():
    """The reason for the spaced notation: BPE merges cannot join digits across the spaces."""
    from rlhf_core.model.loading import train_tokenizer

    rows = arithmetic.demonstrations(2000, seed=0)
    tokenizer = train_tokenizer([r["prompt"] + r["response"] for r in rows], 768)
    pieces = [tokenizer.decode([i]) for i in tokenizer("2 3 + 1 4 = 3 7", add_special_tokens=False)["input_ids"]]
    assert pieces == ["2", " 3", " +", " 1", " 4", " =", " 3", " 7"]


# -- answers through the data path and the params ------------------------------------------------------

def test_params_accept_arithmetic_with_the_default_task_scorer():
    params = params_from_dict({"task": "arithmetic"})
    assert [(s.name, s.kind) for s in params.score.scorers] == [("task", "task")]
    assert params.has_answers is True
    assert params_from_dict({}).has_answers is False  # sentiment prompts carry no answers


def test_arithmetic_scorer_needs_answers_from_a_file_source():
    with pytest.raises(ConfigError, match="reference answers"):
        params_from_dict({"task": "arithmetic", "prepare": {"source": "file", "path": "prompts.jsonl"}})
    params = params_from_dict({"task": "arithmetic",
                               "prepare": {"source": "file", "path": "prompts.jsonl", "answer_field": "answer"}})
    assert params.has_answers is True


def test_read_prompt_records_returns_the_arithmetic_answers():
    params = params_from_dict({"task": "arithmetic", "prepare": {"num_builtin_prompts": 300}})
    records = read_prompt_records(params)
    assert records == arithmetic.prompts(300, params.seed)
    sets = prepare_prompts(records, max_chars=params.prepare.max_prompt_chars, too_long="drop",
                           eval_fraction=0.1, seed=0)
    for frame in (sets.train, sets.eval):
        assert list(frame.columns) == ["prompt", "answer"]
        for prompt, answer in zip(frame["prompt"], frame["answer"]):
            a, b = operands(prompt)
            assert answer.replace(" ", "") == str(a + b)


# -- exact match in the evaluation ---------------------------------------------------------------------

def test_exact_match_by_hand():
    assert exact_match([" 4 2", "4 2 ", " 4 1", ""], ["4 2", " 4 2", "4 2", "4 2"]) == pytest.approx(0.5)
    assert exact_match([" 42", "42", " 41", " 42 3", ""], ["42"] * 5) == pytest.approx(2 / 5)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match([" 1"], ["1", "2"])


def test_evaluate_checkpoint_reports_exact_match_only_with_answers(tiny_checkpoint, tiny_params):
    import torch

    from rlhf_core.model.loading import load_causal_lm, load_tokenizer
    from rlhf_core.phases.evaluation import evaluate_checkpoint
    from rlhf_core.phases.sft import encode_demonstrations

    device = torch.device("cpu")
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    policy = load_causal_lm(str(tiny_checkpoint), device)
    params = replace(tiny_params, task="arithmetic",
                     evaluate=replace(tiny_params.evaluate, samples_per_prompt=1, max_new_tokens=4))
    prompts = ["2 3 + 1 4 =", "1 0 + 4 4 =", "3 1 + 2 2 ="]
    heldout = encode_demonstrations(tokenizer, arithmetic.demonstrations(8, seed=0), 32, chat=params.chat)

    metrics, examples = evaluate_checkpoint(policy, policy, tokenizer, prompts, heldout, params, device,
                                            answers=["3 7", "5 4", "5 3"])
    # the tiny checkpoint was trained on reviews, so it answers no sum; its responses are words
    assert metrics["exact_match"] == 0.0 == metrics["reward_task"]
    # the same seeds give the same responses: taking them as the answers makes every response a match
    responses = [e["response"] for e in examples]
    metrics, examples = evaluate_checkpoint(policy, policy, tokenizer, prompts, heldout, params, device,
                                            answers=responses)
    assert [e["response"] for e in examples] == responses
    assert metrics["exact_match"] == 1.0 == metrics["reward_task"]
    # no answers (sentiment): no exact_match metric
    metrics, _ = evaluate_checkpoint(policy, policy, tokenizer, prompts, heldout, replace(params, task="sentiment"),
                                     device)
    assert "exact_match" not in metrics
