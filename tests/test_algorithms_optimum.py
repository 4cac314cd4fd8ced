"""Every optimizer reaches the known optimum of a synthetic token-level task.

Task: vocabulary of 8 tokens (0 = pad, 1 = EOS, 2..7 ordinary), 4 one-token prompts, horizon 3.
The score of a response is the fraction of the 3 positions that carry the target pattern
TARGET = [5, 6, 7] (a response that stops early scores the positions it has).  The optimal policy
emits TARGET deterministically and its return is exactly 1.0; a uniformly random policy returns
about 1/8.  Every algorithm starts from the same randomly initialised Llama and must reach at least
90% of the optimum within its stated number of rounds (each round: 128 responses, then the
algorithm's updates on them).  There is no KL anchor to a reference here, so after reaching the
optimum some methods wander (whitened advantages amplify noise once nearly every sample scores 1);
the test therefore checks the first round at which the return reaches 90%, as the budget says.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from rlhf_core.advantages import estimator_for, round_advantages
from rlhf_core.algorithms import get_algorithm
from rlhf_core.algorithms.common import Experience
from rlhf_core.config import (AdvantagesParams, AlgorithmParams, GRPOParams, Params, PPOParams, RLOOParams,
                              ReinforceParams, TRPOParams)
from rlhf_core.models import ActorCritic, ValueHead, disable_dropout, seed_everything
from rlhf_core.rollout import generate_samples, record_token_stats

CPU = torch.device("cpu")
TARGET = [5, 6, 7]
PROMPTS = [[2], [3], [4], [2, 3]]
TOKENIZER = SimpleNamespace(eos_token_id=1, pad_token_id=0)
OPTIMAL_RETURN = 1.0


def score(response_ids: list[int]) -> float:
    return sum(1.0 for t, token in enumerate(response_ids[:3]) if token == TARGET[t]) / 3


@pytest.fixture(scope="module")
def initial_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything(0)
    config = LlamaConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16, pad_token_id=0,
                         eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    policy = disable_dropout(LlamaForCausalLM(config))
    return ActorCritic(policy, ValueHead(32))


def run_rounds(model, params: Params, rounds: int, samples_per_prompt: int = 32) -> list[float]:
    """rollout → score → advantages → optimize, in process, for ``rounds`` rounds; mean return per round."""
    train = get_algorithm(params.algorithm.name)
    estimator = estimator_for(params.algorithm.name, params.reinforce.baseline)
    history, baseline = [], 0.0
    for round_number in range(rounds + 1):
        samples = generate_samples(model.policy, TOKENIZER, PROMPTS, samples_per_prompt=samples_per_prompt,
                                   temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=3, batch_size=128,
                                   seed=round_number, device=CPU)
        scores = [score(s.response_ids) for s in samples]
        history.append(sum(scores) / len(scores))
        if round_number == rounds:
            break
        stats = record_token_stats(model, None, samples, pad_id=0, temperature=1.0, batch_size=128, device=CPU,
                                   reference_is_policy=True)
        adv = params.advantages
        arrays, metrics = round_advantages(
            stats["logprobs"], stats["ref_logprobs"], stats["values"], scores, kl_coef=adv.kl_coef,
            kl_estimator=adv.kl_estimator, gamma=adv.gamma, lam=adv.lam, whiten_rewards=adv.whiten_rewards,
            whiten_advantages=adv.whiten_advantages, estimator=estimator,
            group_ids=[s.prompt_index for s in samples], return_type=params.reinforce.return_type,
            baseline=params.reinforce.baseline, moving_baseline=baseline, scale_by_std=params.grpo.scale_by_std,
            eps=params.grpo.eps)
        momentum = params.reinforce.baseline_momentum
        baseline = momentum * baseline + (1 - momentum) * metrics["return_sequence_mean"]
        experience = Experience([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                stats["logprobs"], stats["ref_logprobs"], stats["values"], arrays["advantages"],
                                arrays["returns"])
        train(model, experience, params, temperature=1.0, pad_id=0, device=CPU, seed=round_number,
              log=lambda *_: None)
    return history


BASE = replace(Params(), advantages=replace(AdvantagesParams(), kl_coef=0.0, gamma=1.0, lam=0.95),
               ppo=replace(PPOParams(), epochs=4, minibatch_size=32, micro_batch_size=32, lr=3e-3, target_kl=None,
                           vf_coef=0.1, lr_schedule="constant"))
ONE_PASS = replace(BASE.ppo, minibatch_size=16, micro_batch_size=16)  # reinforce, a2c, rloo: 8 steps per round

# (label, params, budget): the stated number of rounds within which the return must reach 90%.
# The leave-one-out REINFORCE cases use lr 1.5e-3: at 2e-3 approx-KL reached 1–7 per round and the policy
# could collapse onto a deterministic two-of-three answer, where every leave-one-out advantage is 0 and
# learning stops; whether it got out first depended on float-level noise (a change of batch layout flipped it).
CASES = [
    ("reinforce/moving-average", replace(BASE, algorithm=AlgorithmParams("reinforce"), ppo=replace(ONE_PASS, lr=5e-3),
                                         reinforce=ReinforceParams("sequence", "moving_average", 0.5)), 14),
    ("reinforce/reward-to-go/leave-one-out", replace(BASE, algorithm=AlgorithmParams("reinforce"),
                                                     ppo=replace(ONE_PASS, lr=1.5e-3),
                                                     reinforce=ReinforceParams("reward_to_go", "leave_one_out")), 26),
    ("a2c", replace(BASE, algorithm=AlgorithmParams("a2c"), ppo=replace(ONE_PASS, lr=1e-3)), 34),
    ("ppo", replace(BASE, algorithm=AlgorithmParams("ppo")), 15),
    ("ppo/dual-clip/seq-ratio/seq-mean", replace(BASE, algorithm=AlgorithmParams("ppo"), ppo=replace(
        BASE.ppo, dual_clip=3.0, ratio_level="sequence", loss_aggregation="seq_mean_token_mean")), 15),
    ("trpo", replace(BASE, algorithm=AlgorithmParams("trpo"), trpo=replace(TRPOParams(), max_kl=0.1, steps=4)), 12),
    ("npg", replace(BASE, algorithm=AlgorithmParams("npg"), trpo=replace(TRPOParams(), max_kl=0.1, steps=4)), 12),
    ("grpo", replace(BASE, algorithm=AlgorithmParams("grpo"), grpo=replace(GRPOParams(), kl_coef=0.0)), 16),
    ("grpo/dr-grpo", replace(BASE, algorithm=AlgorithmParams("grpo"),
                             grpo=replace(GRPOParams(), kl_coef=0.0, scale_by_std=False)), 16),
    ("rloo/reinforce", replace(BASE, algorithm=AlgorithmParams("rloo"), ppo=replace(ONE_PASS, lr=1.5e-3)), 24),
    ("rloo/clipped", replace(BASE, algorithm=AlgorithmParams("rloo"), rloo=RLOOParams("clipped")), 16),
]


@pytest.mark.parametrize(("label", "params", "rounds"), CASES, ids=[c[0] for c in CASES])
def test_reaches_ninety_percent_of_the_optimum(initial_model, label, params, rounds):
    model = copy.deepcopy(initial_model)
    history = run_rounds(model, params, rounds)
    assert history[0] < 0.3, history  # the random start is far from the optimum
    assert max(history) >= 0.9 * OPTIMAL_RETURN, (label, [round(h, 3) for h in history])
