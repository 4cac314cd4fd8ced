from collections import Counter

import pytest
import torch

from rlhf_core.config import KLParams, OptimParams, Params, PPOParams, replace
from rlhf_core.errors import ConfigError
from rlhf_core.model.checkpoints import load_actor_critic
from rlhf_core.model.device import seed_everything
from rlhf_core.model.loading import load_tokenizer
from rlhf_core.phases.rollout import generate_samples, record_token_stats
from rlhf_core.rl.advantages import round_advantages
from rlhf_core.rl.algorithms import registry
from rlhf_core.rl.algorithms.common import Experience
from rlhf_core.rl.algorithms.ppo import train_ppo

CPU = torch.device("cpu")
PROMPTS = ["The pizza was", "Honestly, the laptop seemed", "So far the movie is", "The room felt",
           "Overall, the staff was", "The battery is", "Frankly, the soup seemed", "The ending was"]


def training(**settings) -> Params:
    """Default Params with the given optim:, ppo: and kl: fields changed (each name lives in exactly one)."""
    sections = {"optim": OptimParams, "ppo": PPOParams, "kl": KLParams}
    changes = {name: {k: v for k, v in settings.items() if k in cls.model_fields} for name, cls in sections.items()}
    assert sum(map(len, changes.values())) == len(settings), settings
    defaults = Params()
    return replace(defaults, **{name: replace(getattr(defaults, name), **fields) for name, fields in changes.items()})


def collect(model, tokenizer, reward_fn, seed, samples_per_prompt=8, temperature=1.0):
    """One in-process round of rollout + scoring + advantages; returns (experience, mean reward)."""
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    samples = generate_samples(model.policy, tokenizer, prompt_ids, samples_per_prompt=samples_per_prompt,
                               temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=6, batch_size=64,
                               seed=seed, device=CPU)
    stats = record_token_stats(model, None, samples, pad_id=tokenizer.pad_token_id, temperature=temperature,
                               batch_size=64, device=CPU, reference_is_policy=True)
    scores = [reward_fn(s) for s in samples]
    arrays, _ = round_advantages(stats["logprobs"], stats["ref_logprobs"], stats["values"], scores, kl_coef=0.0,
                                 kl_estimator="k1", gamma=1.0, lam=0.95, whiten_rewards=False, whiten_advantages=True)
    experience = Experience([s.prompt_ids for s in samples], [s.response_ids for s in samples], stats["logprobs"],
                            stats["ref_logprobs"], stats["values"], arrays["advantages"], arrays["returns"],
                            rewards=arrays["rewards"])
    return experience, sum(scores) / len(scores)


def test_first_minibatch_has_ratio_one_and_zero_approx_kl(tiny_checkpoint):
    """On an unchanged policy, the first PPO minibatch sees ratio 1 (to 1e-5) and approx-KL 0."""
    seed_everything(0)
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    experience, _ = collect(model, tokenizer, lambda s: float(len(s.response_ids)), seed=1, temperature=0.8)
    params = training(epochs=1, minibatch_size=16, micro_batch_size=4, target_kl=None)
    metrics = train_ppo(model, experience, params, temperature=0.8, pad_id=tokenizer.pad_token_id, device=CPU, seed=0,
                        log=lambda *_: None)
    assert metrics["first_minibatch_ratio_max_deviation"] < 1e-5
    assert metrics["first_minibatch_approx_kl"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["optimizer_steps"] == 4


def test_micro_batching_gives_the_same_gradient_as_one_batch(tiny_checkpoint):
    """Token-mean over the minibatch: gradient accumulation over micro-batches changes nothing."""
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    updated = []
    for micro in (16, 4):
        seed_everything(0)
        model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
        experience, _ = collect(model, tokenizer, lambda s: float(s.response_ids[0] % 3), seed=2, samples_per_prompt=2)
        params = training(epochs=1, minibatch_size=16, micro_batch_size=micro, lr=1e-3, lr_schedule="constant")
        train_ppo(model, experience, params, temperature=1.0, pad_id=tokenizer.pad_token_id, device=CPU, seed=0,
                  log=lambda *_: None)
        updated.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(updated[0], updated[1], atol=1e-5)


def test_target_kl_stops_early(tiny_checkpoint):
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    experience, _ = collect(model, tokenizer, lambda s: float(s.response_ids[0] % 2), seed=3)
    params = training(epochs=8, minibatch_size=16, micro_batch_size=16, lr=3e-2, target_kl=1e-3)
    metrics = train_ppo(model, experience, params, temperature=1.0, pad_id=tokenizer.pad_token_id, device=CPU, seed=0,
                        log=lambda *_: None)
    assert metrics["early_stopped"] is True
    assert metrics["optimizer_steps"] < metrics["planned_steps"]


@pytest.mark.parametrize("critic", ["value_head", "separate"])
def test_ppo_reaches_and_holds_the_known_optimum(tiny_checkpoint, critic):
    """Reward 1 when the response starts with one chosen token, else 0: the optimum is 1.

    The chosen token is the most frequent first token whose share starts between 10% and 50%.  Over three starts
    (the rollouts' seeds differ), the mean of each start's reward over its last two rounds and a held-out final
    sample must be at least 0.9 after 8 rounds: reached and held, not touched once (the old criterion, any round
    of one seed, passes a method that wanders off again; tests/test_algorithms_optimum.py rejects it too).
    """
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    params = training(epochs=4, minibatch_size=32, micro_batch_size=16, lr=3e-3, clip_range=0.3,
                      target_kl=None, vf_coef=0.5)
    finals, histories = [], {}
    for start in range(3):
        seed_everything(start)
        model = load_actor_critic(str(tiny_checkpoint), critic, CPU)
        probe, _ = collect(model, tokenizer, lambda s: 0.0, seed=100)
        total = len(probe.response_ids)
        shares = Counter(ids[0] for ids in probe.response_ids)
        target = next(token for token, count in shares.most_common() if 0.1 <= count / total <= 0.5)

        def reward(sample):
            return 1.0 if sample.response_ids[0] == target else 0.0

        history = []
        for round_number in range(8):
            experience, mean_reward = collect(model, tokenizer, reward, seed=1000 * start + round_number)
            history.append(mean_reward)
            train_ppo(model, experience, params, temperature=1.0, pad_id=tokenizer.pad_token_id, device=CPU,
                      seed=round_number, log=lambda *_: None)
        _, final = collect(model, tokenizer, reward, seed=1000 * start + 999)
        histories[start] = (shares[target] / total, history, final)
        assert history[0] < 0.6, histories[start]  # each start is far from the optimum
        finals.append((history[-2] + history[-1] + final) / 3)
    assert sum(finals) / len(finals) >= 0.9, (finals, histories)


def test_unknown_algorithm_is_a_config_error():
    from rlhf_core.config import params_from_dict

    assert registry.get("ppo").traits.clipped
    with pytest.raises(KeyError, match="algorithm.name = .sac.: must be one of reinforce, a2c, ppo"):
        registry.get("sac")
    with pytest.raises(ConfigError, match=r"^algorithm.name = 'sac': must be one of 'reinforce', 'a2c', 'ppo', "):
        params_from_dict({"algorithm": {"name": "sac"}})


def test_max_grad_norm_null_turns_clipping_off(tiny_checkpoint):
    """optim.max_grad_norm (ppo.max_grad_norm then): null was refused ('must be a number'), so clipping could not
    be turned off."""
    from rlhf_core.config import params_from_dict

    assert params_from_dict({"optim": {"max_grad_norm": None}}).optim.max_grad_norm is None
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    moved = {}
    for max_grad_norm in (1e-9, None):
        seed_everything(0)
        model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        experience, _ = collect(model, tokenizer, lambda s: float(s.response_ids[0] % 3), seed=2, samples_per_prompt=2)
        params = training(epochs=1, minibatch_size=16, micro_batch_size=16, lr=1e-3, lr_schedule="constant",
                      max_grad_norm=max_grad_norm, target_kl=None)
        metrics = train_ppo(model, experience, params, temperature=1.0, pad_id=tokenizer.pad_token_id,
                            device=CPU, seed=0, log=lambda *_: None)
        moved[max_grad_norm] = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).abs().max()
        assert metrics["grad_norm"] > 1e-6  # the norm before clipping is logged either way
    assert moved[None] > 10 * moved[1e-9]  # clipped to 1e-9 the AdamW steps drown in eps; unclipped they do not


@pytest.mark.parametrize("critic", ["value_head", "separate"])
def test_critic_warmup_fits_the_value_and_leaves_the_policy_as_it_is(tiny_checkpoint, critic):
    """algorithm.critic_warmup_epochs: value-only steps before the first policy update move the critic's own
    parameters (the head; a separate critic's backbone too) toward the returns, and not one policy weight (the
    shared backbone's gradient from the value loss is dropped)."""
    from rlhf_core.rl.algorithms.common import minibatch_updates
    from rlhf_core.rl.algorithms.ppo import ppo_loss

    seed_everything(0)
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    model = load_actor_critic(str(tiny_checkpoint), critic, CPU)
    experience, _ = collect(model, tokenizer, lambda s: float(len(s.response_ids)), seed=3, samples_per_prompt=4)
    params = training(epochs=1, minibatch_size=16, micro_batch_size=8, lr=1e-2, lr_schedule="linear",
                      warmup_steps=5, target_kl=None)
    policy_before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    critic_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("policy.")}
    metrics = minibatch_updates(model, experience, params, epochs=0, temperature=1.0, pad_id=tokenizer.pad_token_id,
                                device=CPU, seed=0, log=lambda *_: None, critic_warmup_epochs=4,
                                loss_fn=lambda out, micro, totals: ppo_loss(out, micro, totals, params))
    assert metrics["critic_warmup_steps"] == 4 * 2  # 32 responses, 16 per step
    # at the peak lr (the linear warm-up of the schedule would start it at 0), the value loss falls
    assert metrics["critic_warmup_value_loss_last"] < 0.75 * metrics["critic_warmup_value_loss_first"]
    assert all(torch.equal(policy_before[k], v) for k, v in model.policy.state_dict().items())
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if k in critic_before
               and not torch.equal(critic_before[k], v)}
    assert changed == ({"value_head"} if critic == "value_head" else {"value_head", "critic_backbone"})
    # the advantages the policy phase uses: GAE of the same token rewards with the warmed critic's values
    from rlhf_core.rl.advantages import gae, masked_whiten, pad_sequences
    from rlhf_core.rl.algorithms.common import split

    values = [None] * len(experience)
    with torch.no_grad():
        for indices in split(list(range(len(experience))), 5):
            out = model(experience.micro_batch(indices, tokenizer.pad_token_id, CPU).batch, 1.0, with_values=True)
            for row, index in enumerate(indices):
                values[index] = out.values[row, :len(experience.response_ids[index])]
    rewards, mask = pad_sequences(experience.rewards)
    values_t, _ = pad_sequences([v.tolist() for v in values])
    advantages, returns = gae(rewards, values_t, mask, 1.0, 0.95)
    advantages = masked_whiten(advantages, mask)
    # (other micro-batches than the warm-up's, so other padding: float32 noise, whitening scales it up)
    assert torch.allclose(pad_sequences(experience.advantages)[0], advantages, atol=1e-3)
    assert torch.allclose(pad_sequences(experience.returns)[0], returns, atol=1e-4)
    assert torch.allclose(pad_sequences(experience.old_values)[0], values_t, atol=1e-4)
    assert metrics["critic_warmup_value_change"] > 0.1


def test_after_the_critic_warmup_the_first_policy_step_is_still_on_policy(tiny_checkpoint):
    """The warm-up leaves π as the rollout saw it: the first PPO minibatch still sees ratio 1 and approx-KL 0."""
    seed_everything(0)
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    experience, _ = collect(model, tokenizer, lambda s: float(len(s.response_ids)), seed=1, temperature=0.8)
    params = training(epochs=1, minibatch_size=16, micro_batch_size=4, lr=1e-2, target_kl=None)
    metrics = train_ppo(model, experience, params, temperature=0.8, pad_id=tokenizer.pad_token_id, device=CPU, seed=0,
                        log=lambda *_: None, critic_warmup_epochs=2)
    assert metrics["critic_warmup_steps"] == 2 * 4
    assert metrics["first_minibatch_ratio_max_deviation"] < 1e-5
    assert metrics["first_minibatch_approx_kl"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["optimizer_steps"] == 4


def test_critic_warmup_needs_a_critic_trained_by_the_update_loop():
    from rlhf_core.config import params_from_dict

    for algorithm in ("grpo", "rloo", "trpo", "npg", "reinforce"):
        raw = {"algorithm": {"name": algorithm, "critic_warmup_epochs": 2}}
        if algorithm == "grpo":
            raw["kl"] = {"reward_coef": 0.0}
        with pytest.raises(ConfigError, match=f"critic_warmup_epochs = 2: algorithm.name = '{algorithm}' has no critic"):
            params_from_dict(raw)
    for raw in ({"algorithm": {"name": "ppo", "critic_warmup_epochs": 2}},
                {"algorithm": {"name": "a2c", "critic_warmup_epochs": 2}},
                {"algorithm": {"name": "reinforce", "critic_warmup_epochs": 2}, "reinforce": {"baseline": "value"}}):
        assert params_from_dict(raw).algorithm.critic_warmup_epochs == 2


@pytest.mark.parametrize("loss", ["ppo", "reinforce"])
def test_kl_loss_coef_adds_the_kl_to_reference_term_in_every_first_order_loss(loss):
    """kl.loss_coef · agg(k(log π_θ, log π_ref)), worked by hand: k1 = log π − log π_ref = [0.5, −1.0], token mean
    −0.25, times 0.1; the advantages are 0, so the policy term adds nothing.  reinforce (and a2c, rloo) used to have
    no KL loss term at all."""
    from types import SimpleNamespace

    from rlhf_core.rl.algorithms.ppo import ppo_loss
    from rlhf_core.rl.algorithms.reinforce import reinforce_loss

    zeros = torch.zeros(1, 2)
    out = SimpleNamespace(logprobs=torch.tensor([[-1.0, -2.0]]), entropy=zeros, values=zeros)
    micro = SimpleNamespace(mask=torch.ones(1, 2), advantages=zeros, returns=zeros, old_values=zeros,
                            old_logprobs=torch.tensor([[-1.0, -2.0]]), ref_logprobs=torch.tensor([[-1.5, -1.0]]),
                            correction=None)
    totals = {"tokens": 2.0, "sequences": 1.0}
    function = ppo_loss if loss == "ppo" else reinforce_loss
    value, stats = function(out, micro, totals, training(loss_coef=0.1, loss_estimator="k1"), use_critic=False)
    assert value.item() == pytest.approx(0.1 * -0.25)
    assert stats["kl_ref"].item() == pytest.approx(-0.5)
    value, stats = function(out, micro, totals, training(), use_critic=False)
    assert value.item() == pytest.approx(0.0) and "kl_ref" not in stats


def test_ppo_loss_uses_clip_higher():
    """ppo.clip_range_high reaches the policy loss: ρ = 1.25 with A = +1 (one token) is clipped to 1.2 by the
    symmetric ε 0.2 (loss −1.2) and kept by ε_high 0.28 (loss −1.25)."""
    from types import SimpleNamespace

    from rlhf_core.rl.algorithms.ppo import ppo_loss

    zeros = torch.zeros(1, 1)
    out = SimpleNamespace(logprobs=torch.tensor([[1.25]]).log(), entropy=zeros, values=zeros)
    micro = SimpleNamespace(mask=torch.ones(1, 1), advantages=torch.ones(1, 1), returns=zeros, old_values=zeros,
                            old_logprobs=zeros, ref_logprobs=zeros, correction=None)
    totals = {"tokens": 1.0, "sequences": 1.0}
    symmetric, _ = ppo_loss(out, micro, totals, training(), use_critic=False)
    higher, stats = ppo_loss(out, micro, totals, training(clip_range_high=0.28), use_critic=False)
    assert symmetric.item() == pytest.approx(-1.2) and higher.item() == pytest.approx(-1.25)
    assert stats["clip_fraction"].item() == 0.0


def test_carried_optimizer_state_makes_two_rounds_one_optimizer(tiny_checkpoint, tmp_path):
    """optim.carry_state: round 2 restored from the files beside round 1's checkpoint takes, bit for bit, the steps
    of the same AdamW continuing in memory; a fresh AdamW in round 2 (the default) takes other steps."""
    from rlhf_core.model.checkpoints import save_checkpoint
    from rlhf_core.rl.optim import OPTIMIZER_STATE_FILE, load_optimizer_state, save_optimizer_state

    params = training(epochs=1, minibatch_size=16, micro_batch_size=8, lr=1e-3, lr_schedule="constant",
                      target_kl=None, carry_state=True)
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    seed_everything(0)
    probe = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    rounds = [collect(probe, tokenizer, lambda s: float(s.response_ids[0] % 3), seed=seed, samples_per_prompt=4)[0]
              for seed in (1, 2)]

    def run_round(model, experience, seed, carry):
        kwargs = {} if carry is None else {"carry": carry}
        train_ppo(model, experience, params, temperature=1.0, pad_id=tokenizer.pad_token_id, device=CPU, seed=seed,
                  log=lambda *_: None, **kwargs)

    def weights(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    in_memory = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    carry = {}
    run_round(in_memory, rounds[0], 0, carry)
    assert carry["carried_in"] is False  # round 1 starts from sft: nothing to carry
    run_round(in_memory, rounds[1], 1, carry)
    assert carry["carried_in"] is True
    assert {float(values["step"]) for values in carry["state"].values()} == {4.0}  # 2 steps in each round

    through_files = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    first = {}
    run_round(through_files, rounds[0], 0, first)
    save_checkpoint(tmp_path, through_files, tokenizer, {})
    save_optimizer_state(tmp_path, first["state"])
    assert (tmp_path / OPTIMIZER_STATE_FILE).read_bytes()[:8]  # a safetensors file, not a pickle
    restored = load_actor_critic(str(tmp_path), "value_head", CPU)
    second = {"state": load_optimizer_state(tmp_path)}
    assert all(torch.equal(second["state"][name][key], first["state"][name][key])
               for name in first["state"] for key in first["state"][name])
    run_round(restored, rounds[1], 1, second)
    assert torch.equal(weights(restored), weights(in_memory))

    fresh = load_actor_critic(str(tmp_path), "value_head", CPU)
    run_round(fresh, rounds[1], 1, None)
    assert not torch.equal(weights(fresh), weights(in_memory))


def test_carried_state_for_other_parameters_is_refused_in_one_line(tiny_checkpoint):
    """A value-head-only state cannot silently seed a policy that trains other parameters."""
    from rlhf_core.runtime.distributed import Runtime

    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    state = {"value_head.weight": {"step": torch.tensor(1.0)}}
    with pytest.raises(ConfigError, match=r"the carried optimizer state is for other parameters \(value_head.weight, "):
        Runtime(device=CPU).load_optimizer_state(model, optimizer, state)


def test_correction_weights_reach_the_policy_loss_through_the_micro_batch():
    """Experience.correction (rollout_correction's weights) is padded into the micro-batch and multiplies the policy
    loss of ppo and reinforce: weights ½ halve it, weights 0 remove it; select keeps them with their rows."""
    from types import SimpleNamespace

    from rlhf_core.rl.algorithms.common import Experience
    from rlhf_core.rl.algorithms.ppo import ppo_loss
    from rlhf_core.rl.algorithms.reinforce import reinforce_loss

    experience = Experience([[5], [6, 7]], [[8, 9], [10]], [[-1.0, -2.0], [-0.5]], None, [[0.0, 0.0], [0.0]],
                            [[1.0, -2.0], [3.0]], [[0.0, 0.0], [0.0]])
    out = SimpleNamespace(logprobs=torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]), entropy=torch.zeros(2, 2),
                          values=torch.zeros(2, 2))
    totals = {"tokens": 3.0, "sequences": 2.0}
    losses = {}
    for weight in (1.0, 0.5, 0.0):
        experience.correction = [[weight, weight], [weight]]
        micro = experience.micro_batch([0, 1], pad_id=0, device=torch.device("cpu"))
        assert torch.equal(micro.correction, torch.tensor([[weight, weight], [weight, 0.0]]))
        losses[weight] = [ppo_loss(out, micro, totals, training(), use_critic=False)[0].item(),
                          reinforce_loss(out, micro, totals, training(), use_critic=False)[0].item()]
    assert losses[1.0][0] != 0.0 and losses[1.0][1] != 0.0
    assert losses[0.5] == pytest.approx([value / 2 for value in losses[1.0]])
    assert losses[0.0] == pytest.approx([0.0, 0.0])
    kept = experience.select([False, True])
    assert kept.correction == [[0.0]] and kept.ref_logprobs is None and kept.response_ids == [[10]]


def test_refreshed_advantages_are_the_advantages_stages_with_truncated_rows_left_out(tiny_checkpoint):
    """refresh_advantages promises the advantages stage's values with the warmed critic.  The stage whitens over every
    row of the round; with advantages.mask_truncated the update trains on fewer (Experience.select), and the refresh
    used to whiten over those alone.  Here the critic is unchanged, so the refresh must give back the stage's own
    advantages, returns and values on the trained rows."""
    from rlhf_core.rl.algorithms.common import refresh_advantages
    from rlhf_core.runtime.distributed import Runtime

    seed_everything(0)
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    model.value_head.summary.bias.data.fill_(0.7)  # values far from 0: a whitening over other rows would differ
    whole, _ = collect(model, tokenizer, lambda s: float(len(s.response_ids)), seed=4)
    trained = [row % 3 != 0 for row in range(len(whole))]  # a third left out, as mask_truncated would
    experience = whole.select(trained)
    refresh_advantages(model, experience, training(micro_batch_size=8), Runtime(device=CPU), pad_id=tokenizer.pad_token_id,
                       device=CPU, temperature=1.0)
    stage = [row for row, kept in zip(range(len(whole)), trained) if kept]
    for name in ("advantages", "returns", "old_values"):
        for got, row in zip(getattr(experience, name), stage):
            assert torch.allclose(torch.tensor(got), torch.as_tensor(getattr(whole, name)[row]).float(), atol=1e-5), name
    # whitened over the trained rows alone (the old refresh), the advantages are another set
    from rlhf_core.rl.advantages import masked_whiten, pad_sequences

    kept_only, mask = pad_sequences([whole.advantages[row] for row in stage])
    assert not torch.allclose(masked_whiten(kept_only, mask), kept_only, atol=1e-3)
