from dataclasses import replace as replace_experience

import numpy as np
import pytest
import torch

from rlhf_core.config import AlgorithmParams, OptimParams, Params, TRPOParams, replace
from rlhf_core.model.checkpoints import load_actor_critic
from rlhf_core.model.device import seed_everything
from rlhf_core.model.forward import response_logits, token_logprobs
from rlhf_core.model.loading import load_tokenizer
from rlhf_core.phases.rollout import generate_samples, record_token_stats
from rlhf_core.rl.algorithms.common import Experience, split
from rlhf_core.rl.algorithms.trpo import train_trpo

CPU = torch.device("cpu")
TEMPERATURE = 0.9
PROMPTS = ["The pizza was", "Honestly, the laptop seemed", "So far the movie is", "The room felt",
           "Overall, the staff was", "The battery is", "Frankly, the soup seemed", "The ending was"]


def quiet(*_):
    """A log function that discards the training log."""
    return None


def collect(model, tokenizer, reward_fn, seed, samples_per_prompt=4):
    """One in-process rollout; advantages = the whitened score broadcast to every token, returns = the score."""
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    samples = generate_samples(model.policy, tokenizer, prompt_ids, samples_per_prompt=samples_per_prompt,
                               temperature=TEMPERATURE, top_p=1.0, top_k=0, max_new_tokens=6, batch_size=64,
                               seed=seed, device=CPU)
    stats = record_token_stats(model, None, samples, pad_id=tokenizer.pad_token_id, temperature=TEMPERATURE,
                               batch_size=64, device=CPU, reference_is_policy=True)
    scores = np.array([reward_fn(s) for s in samples], dtype=np.float32)
    whitened = (scores - scores.mean()) / (scores.std() + 1e-8)
    advantages = [np.full(len(s.response_ids), a, dtype=np.float32) for s, a in zip(samples, whitened)]
    returns = [np.full(len(s.response_ids), r, dtype=np.float32) for s, r in zip(samples, scores)]
    return Experience([s.prompt_ids for s in samples], [s.response_ids for s in samples], stats["logprobs"],
                      stats["ref_logprobs"], stats["values"], advantages, returns)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def experience(tiny_checkpoint, tokenizer):
    """On-policy data of the checkpoint; reward: 1 when the first response token is even."""
    seed_everything(0)
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    return collect(model, tokenizer, lambda s: float(s.response_ids[0] % 2 == 0), seed=7)


def make_params(name="trpo", **trpo):
    trpo = {"critic_epochs": 0, **trpo}
    return replace(Params(), algorithm=AlgorithmParams(name=name, critic="value_head"),
                   optim=replace(OptimParams(), minibatch_size=16, micro_batch_size=8), trpo=replace(TRPOParams(), **trpo))


def run(model, experience, params, tokenizer, seed=0):
    return train_trpo(model, experience, params, temperature=TEMPERATURE, pad_id=tokenizer.pad_token_id, device=CPU,
                      seed=seed, log=quiet)


def round_logits(model, experience, tokenizer):
    """Per micro-batch: (temperature-scaled logits [B,R,V], log π(a_t) [B,R], micro-batch), computed here."""
    out = []
    with torch.no_grad():
        for indices in split(list(range(len(experience))), 32):
            mb = experience.micro_batch(indices, tokenizer.pad_token_id, CPU)
            logits, _ = response_logits(model.policy, mb.batch)
            logprobs, _ = token_logprobs(logits, mb.batch.response_ids, TEMPERATURE)
            out.append((logits.float() / TEMPERATURE, logprobs, mb))
    return out


def mean_kl_and_surrogate(before, after):
    """Exact token-mean KL(π_before ‖ π_after) (via F.kl_div) and the token-mean surrogate ρ·A of `after`."""
    kl, surrogate, tokens = 0.0, 0.0, 0.0
    for (old_logits, _, mb), (new_logits, new_logprobs, _) in zip(before, after):
        per_token = torch.nn.functional.kl_div(torch.log_softmax(new_logits, -1), torch.log_softmax(old_logits, -1),
                                               log_target=True, reduction="none").sum(-1)
        kl += (per_token * mb.mask).sum().item()
        surrogate += (torch.exp(new_logprobs - mb.old_logprobs) * mb.advantages * mb.mask).sum().item()
        tokens += mb.mask.sum().item()
    return kl / tokens, surrogate / tokens


def policy_state(model):
    return {name: p.detach().clone() for name, p in model.policy.named_parameters()}


def test_accepted_trpo_step_stays_in_the_trust_region_and_improves(tiny_checkpoint, tokenizer, experience):
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    delta = 0.01
    before = round_logits(model, experience, tokenizer)
    start = policy_state(model)
    metrics = run(model, experience, make_params(max_kl=delta), tokenizer)
    after = round_logits(model, experience, tokenizer)
    kl, surrogate_after = mean_kl_and_surrogate(before, after)
    _, surrogate_before = mean_kl_and_surrogate(before, before)

    assert metrics["accepted"] is True
    assert 0.0 < kl <= 1.5 * delta
    assert metrics["kl_after_step"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert surrogate_after > surrogate_before
    assert metrics["surrogate_improvement"] == pytest.approx(surrogate_after - surrogate_before, rel=1e-3, abs=1e-7)
    assert metrics["policy_grad_norm"] > 0 and metrics["cg_iterations"] >= 1 and metrics["step_size"] > 0
    assert any(not torch.equal(p.detach(), start[n]) for n, p in model.policy.named_parameters())
    assert all(isinstance(v, (bool, int, float)) for v in metrics.values())


def test_rejected_line_search_restores_every_parameter_bit_for_bit(tiny_checkpoint, tokenizer, experience):
    """A huge trust region (δ = 1e4) with no backtracking: the one candidate is far outside the region where
    the linear model of the surrogate holds, so it lowers the surrogate and is rejected."""
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    start = policy_state(model)
    metrics = run(model, experience, make_params(max_kl=1e4, max_backtracks=0), tokenizer)
    assert metrics["accepted"] is False
    assert metrics["backtracks"] == 1 and metrics["step_size"] == 0.0 and metrics["kl_after_step"] == 0.0
    for name, p in model.policy.named_parameters():
        assert torch.equal(p.detach(), start[name]), name


def test_zero_advantages_make_no_update(tiny_checkpoint, tokenizer, experience):
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    start = policy_state(model)
    flat = replace_experience(experience, advantages=[np.zeros_like(a) for a in experience.advantages])
    metrics = run(model, flat, make_params(), tokenizer)
    assert metrics["accepted"] is False and metrics["policy_grad_norm"] == 0.0
    assert all(torch.equal(p.detach(), start[n]) for n, p in model.policy.named_parameters())


def test_npg_takes_the_full_step_with_kl_near_delta(tiny_checkpoint, tokenizer, experience):
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    delta = 0.01
    before = round_logits(model, experience, tokenizer)
    metrics = run(model, experience, make_params("npg", max_kl=delta), tokenizer)
    kl, _ = mean_kl_and_surrogate(before, round_logits(model, experience, tokenizer))
    assert metrics["accepted"] is True and metrics["backtracks"] == 0
    assert metrics["step_size"] == pytest.approx(metrics["full_step_norm"])
    assert delta / 3 <= kl <= 3 * delta


def test_micro_batching_does_not_change_the_step(tiny_checkpoint, tokenizer, experience):
    updated = []
    for micro in (32, 5):
        model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
        params = make_params("npg")
        params = replace(params, optim=replace(params.optim, micro_batch_size=micro))
        run(model, experience, params, tokenizer)
        updated.append(torch.cat([p.detach().flatten() for p in model.policy.parameters()]))
    assert torch.allclose(updated[0], updated[1], atol=1e-6)


def test_last_n_blocks_changes_only_the_last_block(tiny_checkpoint, tokenizer, experience):
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    policy = model.policy
    # The tiny Llama ties its LM head to the input embeddings; untie them so the embeddings are not
    # trained through the (always trainable) LM head.
    policy.lm_head.weight = torch.nn.Parameter(policy.model.embed_tokens.weight.detach().clone())
    start = policy_state(model)
    metrics = run(model, experience, make_params(trainable_last_n_blocks=1, max_kl=0.02), tokenizer)
    assert metrics["accepted"] is True

    def changed(prefix):
        return [not torch.equal(p.detach(), start[n]) for n, p in policy.named_parameters() if n.startswith(prefix)]

    last = len(policy.model.layers) - 1
    assert not any(changed("model.embed_tokens."))
    assert not any(changed("model.layers.0."))
    assert any(changed(f"model.layers.{last}."))
    assert any(changed("lm_head."))
    assert all(p.requires_grad for p in model.parameters())  # frozen blocks are re-enabled


def test_shared_value_head_regression_lowers_value_loss_and_leaves_the_policy(tiny_checkpoint, tokenizer, experience):
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    assert model.critic_backbone is None
    start = policy_state(model)
    head_start = [p.detach().clone() for p in model.value_head.parameters()]
    flat = replace_experience(experience, advantages=[np.zeros_like(a) for a in experience.advantages])  # no policy step
    metrics = run(model, flat, make_params(critic_epochs=4, critic_lr=1e-2), tokenizer)
    assert metrics["value_loss"] < 0.8 * metrics["value_loss_before_fit"]
    assert all(torch.equal(p.detach(), start[n]) for n, p in model.policy.named_parameters())
    assert all(p.grad is None for p in model.policy.parameters())
    assert any(not torch.equal(p.detach(), s) for p, s in zip(model.value_head.parameters(), head_start))


def test_separate_critic_fits_with_an_accepted_policy_step(tiny_checkpoint, tokenizer, experience):
    model = load_actor_critic(str(tiny_checkpoint), "separate", CPU)
    params = make_params(critic_epochs=2, critic_lr=1e-3)
    params = replace(params, algorithm=AlgorithmParams(name="trpo", critic="separate"))
    metrics = run(model, experience, params, tokenizer)
    assert metrics["accepted"] is True
    assert metrics["value_loss"] < metrics["value_loss_before_fit"]
    assert all(p.grad is None for p in model.policy.parameters())


def test_non_finite_advantages_raise(tiny_checkpoint, tokenizer, experience):
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    bad = replace_experience(experience, advantages=[a.copy() for a in experience.advantages])
    bad.advantages[3][0] = np.nan
    with pytest.raises(FloatingPointError, match="surrogate"):
        run(model, bad, make_params(), tokenizer)
    assert all(p.requires_grad for p in model.parameters())
