"""Every optimizer reaches the known optimum of a synthetic token-level task.

Task: vocabulary of 8 tokens (0 = pad, 1 = EOS, 2..7 ordinary), 4 one-token prompts, horizon 3.
The score of a response is the fraction of the 3 positions that carry the target pattern
TARGET = [5, 6, 7] (a response that stops early scores the positions it has).  The optimal policy
emits TARGET deterministically and its return is exactly 1.0; a uniformly random policy returns
about 1/8.  Every algorithm starts from a randomly initialised Llama and must reach at least
90% of the optimum within its stated number of rounds (each round: 128 responses, then the
algorithm's updates on them).  There is no KL anchor to a reference here, so after reaching the
optimum some methods wander (whitened advantages amplify noise once nearly every sample scores 1);
the test therefore checks the first round at which the return reaches 90%, as the budget says.

One trajectory is chaotic: a float-level change (thread count, SIMD kernel, batch layout) can move the
round at which it first reaches 90% by several rounds, or tip it into a local optimum.  So each case
runs from up to five independent starts (the initial weights and the rollout's sampling seeds both
differ) and passes when three of them reach 90% within the budget; it stops as soon as that is
decided, so a healthy case costs three starts.  Budgets have headroom: where they were tuned (2-core
AMD EPYC, torch 2.13 CPU), the median start reached 90% by about 70% of its budget or earlier, under
one and two threads and the AVX512 and AVX2 kernels (the comments by CASES give the numbers).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf_core.advantages import estimator_for, round_advantages
from rlhf_core.algorithms import get_algorithm
from rlhf_core.algorithms.common import Experience
from rlhf_core.config import (AdvantagesParams, AlgorithmParams, GRPOParams, KLParams, OptimParams, Params, PPOParams,
                              RLOOParams, ReinforceParams, TRPOParams, replace)
from rlhf_core.models import ActorCritic, ValueHead, disable_dropout, seed_everything
from rlhf_core.rollout import generate_samples, record_token_stats

CPU = torch.device("cpu")
TARGET = [5, 6, 7]
PROMPTS = [[2], [3], [4], [2, 3]]
TOKENIZER = SimpleNamespace(eos_token_id=1, pad_token_id=0)
OPTIMAL_RETURN = 1.0


def score(response_ids: list[int]) -> float:
    return sum(1.0 for t, token in enumerate(response_ids[:3]) if token == TARGET[t]) / 3


SEEDS = (0, 1, 2, 3, 4)
REQUIRED = 3  # of the len(SEEDS) starts must reach 90% within the budget (a majority)


def initial_model(seed: int) -> ActorCritic:
    """A randomly initialised one-layer Llama (seeded) with a zero value head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything(seed)
    config = LlamaConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16, pad_token_id=0,
                         eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    policy = disable_dropout(LlamaForCausalLM(config))
    return ActorCritic(policy, ValueHead(32))


def run_rounds(model, params: Params, rounds: int, samples_per_prompt: int = 32, *, seed: int = 0,
               stop_at: float | None = None) -> list[float]:
    """rollout → score → advantages → optimize, in process, for ``rounds`` rounds; mean return per round
    (``rounds`` + 1 values: before each update and after the last).  Round k samples with seed
    ``seed * 1000 + k``.  ``stop_at``: stop early once a round's mean return reaches it."""
    train = get_algorithm(params.algorithm.name)
    estimator = estimator_for(params.algorithm.name, params.reinforce.baseline)
    history, baseline = [], 0.0
    for round_number in range(rounds + 1):
        samples = generate_samples(model.policy, TOKENIZER, PROMPTS, samples_per_prompt=samples_per_prompt,
                                   temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=3, batch_size=128,
                                   seed=seed * 1000 + round_number, device=CPU)
        scores = [score(s.response_ids) for s in samples]
        history.append(sum(scores) / len(scores))
        if round_number == rounds or (stop_at is not None and history[-1] >= stop_at):
            break
        stats = record_token_stats(model, None, samples, pad_id=0, temperature=1.0, batch_size=128, device=CPU,
                                   reference_is_policy=True)
        adv = params.advantages
        arrays, metrics = round_advantages(
            stats["logprobs"], stats["ref_logprobs"], stats["values"], scores, kl_coef=params.kl.reward_coef,
            kl_estimator=params.kl.reward_estimator, gamma=adv.gamma, lam=adv.lam, whiten_rewards=adv.whiten_rewards,
            whiten_advantages=adv.whiten_advantages, estimator=estimator,
            group_ids=[s.prompt_index for s in samples], return_type=params.reinforce.return_type,
            baseline=params.reinforce.baseline, moving_baseline=baseline, scale_by_std=params.grpo.scale_by_std,
            eps=params.grpo.eps)
        momentum = params.reinforce.baseline_momentum
        baseline = momentum * baseline + (1 - momentum) * metrics["return_sequence_mean"]
        experience = Experience([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                stats["logprobs"], stats["ref_logprobs"], stats["values"], arrays["advantages"],
                                arrays["returns"])
        train(model, experience, params, temperature=1.0, pad_id=0, device=CPU, seed=seed * 1000 + round_number,
              log=lambda *_: None)
    return history


BASE = replace(Params(), advantages=replace(AdvantagesParams(), gamma=1.0, lam=0.95),
               kl=replace(KLParams(), reward_coef=0.0),
               optim=replace(OptimParams(), epochs=4, minibatch_size=32, micro_batch_size=32, lr=3e-3, vf_coef=0.1,
                             lr_schedule="constant"),
               ppo=replace(PPOParams(), target_kl=None))
ONE_PASS = replace(BASE.optim, minibatch_size=16, micro_batch_size=16)  # reinforce, a2c, rloo: 8 steps per round

# (label, params, budget): the stated number of rounds within which the return must reach 90%.  The comment
# after each case: the median and the slowest first round at 90%, measured when the budget was set over
# seeds 0–9 under each of 1 thread + AVX512, 2 threads + AVX512 and 1 thread + AVX2 (30 runs), or as noted.
# The leave-one-out REINFORCE cases use lr 1.5e-3: at 2e-3 approx-KL reached 1–7 per round and the policy
# could collapse onto a deterministic two-of-three answer, where every leave-one-out advantage is 0 and
# learning stops.  The moving-average case collapsed there too at lr 5e-3 (2 of 30 starts with AVX512,
# 2 of 10 with AVX2); at lr 3e-3 with a small entropy bonus it gets out.  npg steps a fixed KL (no line
# search), so near the optimum it keeps moving by max_kl and hovers below it: with four steps of 0.1 per
# round 2 of 5 starts never reached 90%; two steps get there.  trpo's four steps of 0.1 took 5 to 16
# rounds over 10 starts; two: 6 to 11.  a2c at lr 2e-3 or 3e-3 collapsed in 7 and 9 of 12 starts.
CASES = [
    ("reinforce/moving-average", replace(BASE, algorithm=AlgorithmParams(name="reinforce"),
                                         optim=replace(ONE_PASS, lr=3e-3, ent_coef=0.01),
                                         reinforce=ReinforceParams(return_type="sequence", baseline="moving_average",
                                                                   baseline_momentum=0.5)),
     18),  # 11, 24: seeds 0–19 × AVX512, AVX2 and no-SIMD kernels, 1 of 60 past 18
    ("reinforce/reward-to-go/leave-one-out", replace(BASE, algorithm=AlgorithmParams(name="reinforce"),
                                                     optim=replace(ONE_PASS, lr=1.5e-3),
                                                     reinforce=ReinforceParams(return_type="reward_to_go",
                                                                               baseline="leave_one_out")),
     26),  # 17, 20 (and 24 over seeds 10–29)
    ("a2c", replace(BASE, algorithm=AlgorithmParams(name="a2c"), optim=replace(ONE_PASS, lr=1e-3)), 40),  # 26, 39; 1 never
    ("ppo", replace(BASE, algorithm=AlgorithmParams(name="ppo")), 15),  # 9, 12
    ("ppo/dual-clip/seq-ratio/seq-mean", replace(BASE, algorithm=AlgorithmParams(name="ppo"), ppo=replace(
        BASE.ppo, dual_clip=3.0, ratio_level="sequence"), optim=replace(BASE.optim, loss_aggregation="seq_mean_token_mean")),
     15),  # 7, 9
    ("trpo", replace(BASE, algorithm=AlgorithmParams(name="trpo"), trpo=replace(TRPOParams(), max_kl=0.1, steps=2)),
     14),  # 8, 11
    ("npg", replace(BASE, algorithm=AlgorithmParams(name="npg"), trpo=replace(TRPOParams(), max_kl=0.1, steps=2)),
     16),  # 8, 12 (and over seeds 0–29 with AVX512: 16, and 1 never)
    ("grpo", replace(BASE, algorithm=AlgorithmParams(name="grpo")), 16),  # 10, 12
    ("grpo/dr-grpo", replace(BASE, algorithm=AlgorithmParams(name="grpo"),
                             grpo=replace(GRPOParams(), scale_by_std=False)), 16),  # 10.5, 11
    ("rloo/reinforce", replace(BASE, algorithm=AlgorithmParams(name="rloo"), optim=replace(ONE_PASS, lr=1.5e-3)),
     26),  # 17, 20: the same estimator as the leave-one-out REINFORCE case
    ("rloo/clipped", replace(BASE, algorithm=AlgorithmParams(name="rloo"), rloo=RLOOParams(objective="clipped")), 16),  # 10, 11
]


@pytest.mark.parametrize(("label", "params", "rounds"), CASES, ids=[c[0] for c in CASES])
def test_reaches_ninety_percent_of_the_optimum(label, params, rounds):
    histories = {}
    for seed in SEEDS:
        history = run_rounds(initial_model(seed), params, rounds, seed=seed, stop_at=0.9 * OPTIMAL_RETURN)
        assert history[0] < 0.3, (label, seed, history)  # each random start is far from the optimum
        histories[seed] = [round(h, 3) for h in history]
        reached = sum(max(h) >= 0.9 * OPTIMAL_RETURN for h in histories.values())
        if reached >= REQUIRED or reached + len(SEEDS) - len(histories) < REQUIRED:
            break  # decided: enough starts reached it, or too few are left to
    assert reached >= REQUIRED, (label, f"{reached} of {len(histories)} starts reached 90% within {rounds} rounds",
                                 histories)
