"""End to end: an environment written by someone else, against docs/environments.md alone (its module lives in the
user's repository, not in rlhf_core), runs 2 rounds of GRPO with `dvc repro` on a locally built model with
SmolLM2's 49k vocabulary and ChatML template: multi-turn rollouts, the environment's score as the reward, the
policy's tokens alone trained on, and the episode metrics in every round's rollout and evaluation.  An edit to the
environment's source re-runs the rollouts and evaluations, and nothing before them."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.e2e.test_pipeline import dvc, make_reduced_repo, ran_stages

pytestmark = pytest.mark.e2e

# Written from docs/environments.md only: reset, step, tools, score; nothing of rlhf_core is imported.
THIRD_PARTY_ENVIRONMENT = '''
class AskTwice:
    """The user asks for a review, then asks once more for a shorter one; the score is 1 when the second
    answer is shorter than the first, else 0."""

    tools = None

    def __init__(self, follow_up="Shorter, please."):
        self.follow_up = follow_up

    def reset(self, prompt_row):
        self.answers = 0
        return [{"role": "user", "content": "Write a review: " + prompt_row["prompt"]}]

    def step(self, assistant_message):
        self.answers += 1
        if self.answers == 1:
            return [{"role": "user", "content": self.follow_up}], None, False
        return [], None, True

    def score(self, episode):
        answers = [m["content"] for m in episode["messages"] if m["role"] == "assistant"]
        if len(answers) < 2:
            return 0.0
        return float(len(answers[1].split()) < len(answers[0].split()))
'''


def test_a_third_party_environment_runs_two_rounds(tmp_path):
    from rlhf_core.tooling.local_models import write_local_model

    model_dir = write_local_model(tmp_path / "smollm2-like", "chatml-49k-tiny")
    workdir = make_reduced_repo(tmp_path / "repo", {
        "device": "cpu",
        "sft": {"model": str(model_dir), "epochs": 2, "num_builtin_demonstrations": 1000, "lr": 1e-2,
                "batch_size": 32, "micro_batch_size": 32},
        "algorithm": {"name": "grpo"},
        "environment": {"kind": "python", "class_path": "ask_twice:AskTwice", "max_turns": 3,
                        "max_episode_tokens": 128},
        "score": {"scorers": [{"name": "episode", "kind": "environment"}]},
        "rollout": {"prompts_per_round": 6, "samples_per_prompt": 2, "max_new_tokens": 24},
        "optim": {"minibatch_size": 12, "micro_batch_size": 6},
        "evaluate": {"num_prompts": 4, "max_new_tokens": 24, "num_perplexity_texts": 8},
    }, user_files={"ask_twice.py": THIRD_PARTY_ENVIRONMENT})
    output = dvc(["repro"], workdir)
    assert {"rollout@r1", "optimize@r1", "rollout@r2", "optimize@r2", "evaluate@r2"} <= ran_stages(output)

    table = pd.read_parquet(workdir / "rollouts/r1/rollouts.parquet")
    assert (table["limit"] == "").any() and (table["turns"] == 2).any()  # some episodes went the whole way
    for _, row in table.iterrows():
        messages = json.loads(row["messages"])
        mask = row["policy_mask"].tolist()
        assert len(mask) == len(row["response_ids"]) and mask[0] == 1
        # every policy turn is policy tokens, everything between them the environment's
        spans = list(zip(row["turn_starts"].tolist(), row["turn_ends"].tolist()))
        assert [i for s, e in spans for i in range(s, e)] == [i for i, m in enumerate(mask) if m]
        if row["limit"] == "":  # the environment ended it: two answers, the follow-up between them
            assert row["turns"] == 2 and [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
            assert messages[2]["content"] == "Shorter, please." and 0 in mask
    rollout = json.loads((workdir / "metrics/r1/rollout.json").read_text())
    assert {"turns_per_episode", "tool_calls_per_episode", "limit_fraction", "episode_reward"} <= set(rollout)
    scores = pd.read_parquet(workdir / "scores/r1/scores.parquet")
    assert scores["episode"].tolist() == table["episode_reward"].tolist()
    for checkpoint in ("sft", "r1", "r2"):  # 4 eval episodes, all logged: the metrics are their means
        evaluation = json.loads((workdir / f"evals/{checkpoint}/metrics.json").read_text())
        logged = [json.loads(line) for line in (workdir / f"evals/{checkpoint}/samples.jsonl").read_text().splitlines()]
        assert len(logged) == 4
        assert evaluation["turns_per_episode"] == sum(e["turns"] for e in logged) / 4
        assert evaluation["limit_fraction"] == sum(e["limit"] != "" for e in logged) / 4
        assert all(e["turns"] == sum(m["role"] == "assistant" for m in e["messages"]) for e in logged)
    sample = json.loads((workdir / "evals/r2/samples.jsonl").read_text().splitlines()[0])
    assert sample["messages"][0]["content"].startswith("Write a review: ")

    # An edit to the environment's source re-runs what it affects: the rollouts and the evaluations.
    source = workdir / "ask_twice.py"
    source.write_text(source.read_text().replace("Shorter, please.", "Shorter now."))
    rerun = ran_stages(dvc(["repro"], workdir))
    assert {"rollout@r1", "rollout@r2", "evaluate_sft", "evaluate@r1"} <= rerun
    assert not rerun & {"prepare", "sft"}
    rerolled = pd.read_parquet(workdir / "rollouts/r1/rollouts.parquet")
    assert any("Shorter now." in text for text in rerolled["messages"])


def test_the_calculator_task_runs_tool_episodes(tmp_path):
    """`task: calculator` alone (reduced sizes): the from-scratch model gets a ChatML tokenizer with tool support,
    learns the tool-call format from the episode demonstrations, and its rounds run calculator episodes whose
    tool calls the environment answers; the reward is the exact match of the final answer."""
    from transformers import AutoTokenizer

    workdir = make_reduced_repo(tmp_path / "repo", {
        "task": "calculator", "algorithm": {"name": "grpo"},
        "sft": {"max_length": 64, "epochs": 3},
        "rollout": {"max_new_tokens": 24}, "evaluate": {"max_new_tokens": 24},
    })
    output = dvc(["repro"], workdir)
    assert {"sft", "rollout@r1", "optimize@r2", "evaluate@r2"} <= ran_stages(output)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "models/sft")
    assert "tools" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer.tokenize("<tool_call>")) == 1
    table = pd.read_parquet(workdir / "rollouts/r1/rollouts.parquet")
    with_tool = [json.loads(m) for m in table["messages"] if '"role": "tool"' in m]
    assert with_tool and table["tool_calls"].sum() > 0  # the format is learned, and the environment answered
    for messages in with_tool:
        assert messages[0]["content"].startswith("What is ") and messages[1]["content"].startswith("<tool_call>")
    scores = pd.read_parquet(workdir / "scores/r1/scores.parquet")
    answers = [str(a) for a in table["answer"]]
    assert scores["task"].tolist() == [float(r.strip() == a) for r, a in zip(table["response"], answers)]
    evaluation = json.loads((workdir / "metrics/eval.json").read_text())
    assert {"exact_match", "tool_calls_per_episode", "limit_fraction"} <= set(evaluation["r2"])
