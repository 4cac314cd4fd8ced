"""End to end: a reward model trained by `train_reward` is the pipeline's only reward, and it works.

A reduced copy of the repo trains a Bradley–Terry reward model on the built-in sentiment preferences
(stage train_reward@bt), then runs two PPO rounds whose reward is that model alone.  VADER sentiment
is kept as a monitored component with weight 0: it does not enter the reward, so its rise shows that
the reward model learned the signal rather than the policy being optimised for VADER directly.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.test_pipeline import dvc, make_reduced_repo, ran_stages

pytestmark = pytest.mark.e2e

REWARD_MODEL_ONLY = {
    # a reference that writes real reviews (held-out perplexity ~1.5): on the babble of the smaller
    # reduced SFT, a reward model trained on clean text has nothing meaningful to rank
    "sft": {"num_builtin_demonstrations": 3000, "epochs": 3},
    "reward_models": {"bt": {"num_builtin_pairs": 1000, "lr": 3e-3}},
    "score": {"scorers": [
        {"name": "rm", "kind": "hf_classifier", "model": "reward_models/bt", "normalize": "running"},
        {"name": "sentiment", "kind": "vader", "weight": 0.0},
    ]},
    "rollout": {"prompts_per_round": 32, "samples_per_prompt": 2, "max_new_tokens": 12},
    "optim": {"epochs": 4, "minibatch_size": 16, "micro_batch_size": 8, "lr": 5e-4},
    "evaluate": {"num_prompts": 32, "samples_per_prompt": 2, "max_new_tokens": 12, "num_perplexity_texts": 40},
}


@pytest.fixture(scope="module")
def reward_pipeline(tmp_path_factory):
    workdir = make_reduced_repo(tmp_path_factory.mktemp("reward_pipeline"), REWARD_MODEL_ONLY)
    outputs = {"repro": dvc(["repro"], workdir)}
    outputs["eval"] = json.loads((workdir / "metrics/eval.json").read_text())
    outputs["reward_model"] = json.loads((workdir / "metrics/reward_models/bt.json").read_text())
    outputs["lr"] = dvc(["exp", "run", "-S", "reward_models.bt.lr=0.002"], workdir)
    return workdir, outputs


def test_reward_model_is_trained_before_any_scoring(reward_pipeline):
    _, outputs = reward_pipeline
    order = re.findall(r"Running stage '([^']+)'", outputs["repro"])
    assert "train_reward@bt" in order
    assert order.index("train_reward@bt") < order.index("score@r1")
    assert outputs["reward_model"]["heldout_pair_accuracy"] >= 0.9


def test_reward_model_alone_raises_vader_sentiment(reward_pipeline):
    _, outputs = reward_pipeline
    evaluation = outputs["eval"]
    # the total is the reward model's score only (VADER's weight is 0) ...
    assert evaluation["r2"]["reward"] == pytest.approx(evaluation["r2"]["reward_rm"], abs=1e-9)
    # ... and the untouched VADER sentiment of the responses still rises
    assert evaluation["r2"]["reward_sentiment"] > evaluation["sft"]["reward_sentiment"] + 0.1, evaluation
    assert evaluation["r2"]["reward_rm"] > evaluation["sft"]["reward_rm"]


def test_changing_the_reward_model_rescores_without_new_rollouts(reward_pipeline):
    _, outputs = reward_pipeline
    ran = ran_stages(outputs["lr"])
    assert {"train_reward@bt", "score@r1", "advantages@r1", "optimize@r1", "rollout@r2", "eval_summary"} <= ran
    assert not {"prepare", "sft", "rollout@r1"} & ran


def test_the_critic_can_start_from_the_pipelines_reward_model(tmp_path):
    """algorithm.critic_init names a reward model directory: dvc.yaml makes rollout and optimize depend on it
    (${algorithm.critic_init}), so train_reward runs first, and round 1's values are the reward model's scores
    (the default critic starts at V = 0)."""
    import pandas as pd

    workdir = make_reduced_repo(tmp_path / "critic", {
        "reward_models": {"rm": {"base": "sft", "num_builtin_pairs": 200, "max_length": 32}},
        "algorithm": {"critic": "separate", "critic_init": "reward_models/rm"},
        "rounds": {"r1": {"from": "sft"}}})
    order = re.findall(r"Running stage '([^']+)'", dvc(["repro"], workdir))
    assert order.index("train_reward@rm") < order.index("rollout@r1")
    values = pd.read_parquet(workdir / "rollouts/r1/rollouts.parquet")["values"]
    assert any(abs(value) > 1e-6 for row in values for value in row)
    assert (workdir / "models/r1/critic").is_dir()  # round 2 would start from round 1's own critic
