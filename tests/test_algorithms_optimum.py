"""Every optimizer reaches, and holds, the known optimum of a synthetic token-level task.

Task: vocabulary of 8 tokens (0 = pad, 1 = EOS, 2..7 ordinary), 4 one-token prompts, horizon 3.
The score of a response is the fraction of the 3 positions that carry the target pattern
TARGET = [5, 6, 7] (a response that stops early scores the positions it has).  The optimal policy
emits TARGET deterministically and its return is exactly 1.0; a uniformly random policy returns
about 1/8.  Every algorithm starts from a randomly initialised Llama and runs its stated number of rounds
(each round: 128 responses, then the algorithm's updates on them).

What passes: over five independent starts (the initial weights and the rollout's sampling seeds both differ), the
mean of each start's return over its final FINAL_ROUNDS rounds, averaged over the starts, is at least 90% of the
optimum.  Not "any round reached 90%": a method that touches the optimum and then wanders off fails.  There is
no KL anchor to a reference here, and once nearly every sample scores 1, whitened advantages amplify noise, so
the settings of each case (below, with what they gave when they were tuned) are those under which the method
also stays there.  One trajectory is chaotic (a float-level change such as the thread count or the SIMD kernel
can tip it into a local optimum); the mean over five starts is not.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf_core.config import (
    AdvantagesParams,
    AlgorithmParams,
    GRPOParams,
    KLParams,
    OptimParams,
    Params,
    PPOParams,
    ReinforceParams,
    ReinforcePPParams,
    RLOOParams,
    TRPOParams,
    replace,
)
from rlhf_core.model.device import seed_everything
from rlhf_core.model.forward import ActorCritic, ValueHead
from rlhf_core.model.loading import disable_dropout
from rlhf_core.phases.rollout import generate_samples, record_token_stats
from rlhf_core.rl.advantages import advantage_settings, round_advantages
from rlhf_core.rl.algorithms.common import Experience
from rlhf_core.rl.algorithms.train import train_round

CPU = torch.device("cpu")
TARGET = [5, 6, 7]
PROMPTS = [[2], [3], [4], [2, 3]]
TOKENIZER = SimpleNamespace(eos_token_id=1, pad_token_id=0)
OPTIMAL_RETURN = 1.0


def score(response_ids: list[int]) -> float:
    return sum(1.0 for t, token in enumerate(response_ids[:3]) if token == TARGET[t]) / 3


SEEDS = (0, 1, 2, 3, 4)
FINAL_ROUNDS = 3  # the return after the last update and after the two before it


def initial_model(seed: int) -> ActorCritic:
    """A randomly initialised one-layer Llama (seeded) with a zero value head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything(seed)
    config = LlamaConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16, pad_token_id=0,
                         eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    policy = disable_dropout(LlamaForCausalLM(config))
    return ActorCritic(policy, ValueHead(32))


def run_rounds(model, params: Params, rounds: int, samples_per_prompt: int = 32, *, seed: int = 0) -> list[float]:
    """rollout → score → advantages → optimize, in process, for ``rounds`` rounds; mean return per round
    (``rounds`` + 1 values: before each update and after the last).  Round k samples with seed
    ``seed * 1000 + k``."""
    train = train_round
    history, baseline = [], 0.0
    for round_number in range(rounds + 1):
        samples = generate_samples(model.policy, TOKENIZER, PROMPTS, samples_per_prompt=samples_per_prompt,
                                   temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=3, batch_size=128,
                                   seed=seed * 1000 + round_number, device=CPU)
        scores = [score(s.response_ids) for s in samples]
        history.append(sum(scores) / len(scores))
        if round_number == rounds:
            break
        stats = record_token_stats(model, None, samples, pad_id=0, temperature=1.0, batch_size=128, device=CPU,
                                   reference_is_policy=True)
        arrays, metrics = round_advantages(
            stats["logprobs"], stats["ref_logprobs"], stats["values"], scores, kl_coef=params.kl.reward_coef,
            group_ids=[s.prompt_index for s in samples], moving_baseline=baseline, **advantage_settings(params))
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

# The stabilisers.  Near the optimum a round's advantages are mostly noise (ppo/a2c: whitened critic residuals, unit
# scale even when every sample scores 1), and the gradient of a near-certain token is tiny (∝ 1 − π); a fresh AdamW
# each round (ε 1e-5) still takes lr-sized steps on it, so the policy was kicked off the optimum every few rounds.
# Lower lr / fewer epochs / target_kl shrank the climb as much as the kicks (ppo at lr 1e-3, 2 epochs: 0.89–0.96).
# AdamW ε = 0.1 makes small gradients take small steps (momentum SGD near the optimum), so the policy stays there;
# lr 2e-2 (clipped objectives) or 1.5e-2 (unclipped one-pass ones) keeps the climb fast; cispo's unclipped gradient
# and a2c's (no clip, whitened advantages) collapsed into a deterministic partial answer at those, hence 1e-2 and
# 5e-3.  vf_coef 1.0 (ppo, a2c): a closer critic, so its residuals do not drown the informative samples.
# trpo/npg step a fixed KL whatever the gradient's size and hovered about 0.9 at any max_kl; cg_damping 3 and a
# faster critic (critic_lr 3e-2, 8 epochs) fixed trpo.  npg has no line search: near a deterministic policy its
# full step overshoots the quadratic model's KL (0.10 and 0.24 measured for δ 0.05) and knocks the return down by
# 0.1–0.4 every few rounds, at any δ 0.01–0.05, 1–4 steps, cg_damping 1–10 tried; its mean over five starts varies
# with float details (0.87–0.97), so it keeps the least margin.  Small steps (δ 0.01 × 4; cg_iters 4 to pay for
# them) varied least.
STEADY = replace(BASE.optim, adam_eps=0.1, lr=2e-2, epochs=2, vf_coef=1.0)  # clipped objectives: 8 steps per round
STEADY_ONE_PASS = replace(ONE_PASS, adam_eps=0.1, lr=1.5e-2, vf_coef=1.0)  # reinforce, a2c, rloo's plain objective
TRUST_REGION = replace(TRPOParams(), max_kl=0.05, steps=2, cg_damping=3.0, critic_lr=3e-2, critic_epochs=8)

# (label, params, rounds).  After each case: the mean over seeds 0–4 of each start's return over its final
# FINAL_ROUNDS rounds (the smallest in brackets) with 1 thread and AVX2 kernels (the test's conditions), then the
# mean with 2 threads and the native (AVX512) kernels, and where measured over seeds 0–9.
CASES = [
    ("reinforce/moving-average", replace(BASE, algorithm=AlgorithmParams(name="reinforce"),
                                         optim=replace(STEADY_ONE_PASS, ent_coef=0.01),
                                         reinforce=ReinforceParams(return_type="sequence", baseline="moving_average",
                                                                   baseline_momentum=0.5)),
     22),  # mean 0.979 (min 0.964) over seeds 0-4; 2 threads + native kernels: 0.979; seeds 0-9: 0.979 (0.964)
    ("reinforce/reward-to-go/leave-one-out", replace(BASE, algorithm=AlgorithmParams(name="reinforce"),
                                                     optim=STEADY_ONE_PASS,
                                                     reinforce=ReinforceParams(return_type="reward_to_go",
                                                                               baseline="leave_one_out")),
     22),  # mean 0.984 (min 0.974) over seeds 0-4; 2 threads + native kernels: 0.984; seeds 0-9: 0.983 (0.974)
    ("a2c", replace(BASE, algorithm=AlgorithmParams(name="a2c"), optim=replace(STEADY_ONE_PASS, lr=5e-3)), 28),
    # mean 0.979 (min 0.971) over seeds 0-4; 2 threads + native kernels: 0.979; seeds 0-9: 0.981 (0.971)
    ("ppo", replace(BASE, algorithm=AlgorithmParams(name="ppo"), optim=STEADY), 18),
    # mean 0.986 (min 0.956) over seeds 0-4; 2 threads + native kernels: 0.986; seeds 0-9: 0.989 (0.956)
    ("ppo/dual-clip/seq-ratio/seq-mean", replace(BASE, algorithm=AlgorithmParams(name="ppo"), ppo=replace(
        BASE.ppo, dual_clip=3.0, ratio_level="sequence"), optim=replace(STEADY, loss_aggregation="seq_mean_token_mean")),
     18),  # mean 0.996 (min 0.993) over seeds 0-4; 2 threads + native kernels: 0.996; seeds 0-9: 0.995 (0.988)
    ("trpo", replace(BASE, algorithm=AlgorithmParams(name="trpo"), trpo=TRUST_REGION), 14),
    # mean 0.980 (min 0.967) over seeds 0-4; 2 threads + native kernels: 0.977; seeds 0-9: 0.975 (0.957)
    ("npg", replace(BASE, algorithm=AlgorithmParams(name="npg"),
                    trpo=replace(TRUST_REGION, max_kl=0.01, steps=4, cg_iters=4)), 20),
    # mean 0.928 (min 0.899) over seeds 0-4; 2 threads + native kernels: 0.881 (min 0.758); seeds 0-9: 0.929 (0.899)
    ("grpo", replace(BASE, algorithm=AlgorithmParams(name="grpo"), optim=STEADY), 16),
    # mean 0.989 (min 0.984) over seeds 0-4; 2 threads + native kernels: 0.989; seeds 0-9: 0.989 (0.977)
    ("grpo/dr-grpo", replace(BASE, algorithm=AlgorithmParams(name="grpo"), optim=STEADY,
                             grpo=replace(GRPOParams(), scale_by_std=False)), 18),
    # mean 0.971 (min 0.964) over seeds 0-4; 2 threads + native kernels: 0.971; seeds 0-9: 0.973 (0.964)
    ("rloo/reinforce", replace(BASE, algorithm=AlgorithmParams(name="rloo"), optim=STEADY_ONE_PASS), 22),
    # mean 0.984 (min 0.974) over seeds 0-4; 2 threads + native kernels: 0.984; seeds 0-9: 0.983 (0.974): the same
    # estimator as the leave-one-out REINFORCE case, and the same returns
    ("rloo/clipped", replace(BASE, algorithm=AlgorithmParams(name="rloo"), optim=STEADY,
                             rloo=RLOOParams(objective="clipped")), 18),
    # mean 0.973 (min 0.969) over seeds 0-4; 2 threads + native kernels: 0.973; seeds 0-9: 0.974 (0.966)
    ("cispo", replace(BASE, algorithm=AlgorithmParams(name="cispo"), optim=replace(STEADY, lr=1e-2)), 16),
    # mean 0.984 (min 0.974) over seeds 0-4; 2 threads + native kernels: 0.984; seeds 0-9: 0.987 (0.974)
    ("sapo", replace(BASE, algorithm=AlgorithmParams(name="sapo"), optim=STEADY), 16),
    # mean 0.996 (min 0.985) over seeds 0-4; 2 threads + native kernels: 0.996; seeds 0-9: 0.995 (0.985)
    ("reinforce_pp", replace(BASE, algorithm=AlgorithmParams(name="reinforce_pp"), optim=STEADY), 16),
    # mean 0.988 (min 0.973) over seeds 0-4; 2 threads + native kernels: 0.988; seeds 0-9: 0.988 (0.970)
    ("reinforce_pp/group-mean", replace(BASE, algorithm=AlgorithmParams(name="reinforce_pp"), optim=STEADY,
                                        reinforce_pp=ReinforcePPParams(baseline="group_mean")), 18),
    # mean 0.993 (min 0.989) over seeds 0-4; 2 threads + native kernels: 0.993; seeds 0-9: 0.988 (0.955)
]


@pytest.mark.parametrize(("label", "params", "rounds"), CASES, ids=[c[0] for c in CASES])
def test_reaches_and_holds_ninety_percent_of_the_optimum(label, params, rounds):
    finals, histories = [], {}
    for seed in SEEDS:
        history = run_rounds(initial_model(seed), params, rounds, seed=seed)
        assert history[0] < 0.3, (label, seed, history)  # each random start is far from the optimum
        histories[seed] = [round(h, 3) for h in history]
        finals.append(sum(history[-FINAL_ROUNDS:]) / FINAL_ROUNDS)
    mean = sum(finals) / len(finals)
    assert mean >= 0.9 * OPTIMAL_RETURN, (label, f"the mean return of the final {FINAL_ROUNDS} rounds over "
                                          f"{len(SEEDS)} starts is {mean:.3f} after {rounds} rounds", histories)
