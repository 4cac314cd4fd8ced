"""FSDP2 sharding of an ActorCritic with an untied LM head (the shape of most real checkpoints), 2 gloo processes.

The pipeline tests (tests/test_distributed.py) run the optimize stage under FSDP2 with the tiny default model,
whose LM head is tied to the embeddings.  Here an untied model goes through ``shard_fsdp2`` directly: the
embeddings and the head become units of their own, and one PPO round gives the one-process update.
"""

from __future__ import annotations

import os

import pytest
import torch

from rlhf_core.model.device import seed_everything
from rlhf_core.model.forward import ActorCritic, ValueHead
from rlhf_core.model.loading import disable_dropout


def untied_actor_critic() -> ActorCritic:
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = ActorCritic(disable_dropout(LlamaForCausalLM(config)), ValueHead(32))
    with torch.no_grad():  # a non-zero value head, so that the critic's gradient flows into the backbone
        model.value_head.summary.weight.normal_(0, 0.1)
    return model


def experience():
    from rlhf_core.rl.algorithms.common import Experience

    generator = torch.Generator().manual_seed(1)
    lengths = [(3, 5), (4, 2), (2, 6), (5, 3), (3, 4), (6, 1), (2, 2), (4, 5)]
    prompts = [torch.randint(2, 96, (p,), generator=generator).tolist() for p, _ in lengths]
    responses = [torch.randint(2, 96, (r,), generator=generator).tolist() for _, r in lengths]

    def per_token(scale, offset=0.0):
        return [(torch.randn(r, generator=generator) * scale + offset).tolist() for _, r in lengths]

    return Experience(prompts, responses, per_token(0.1, -4.5), per_token(0.1, -4.5), per_token(0.1),
                      per_token(1.0), per_token(0.5), rewards=per_token(0.3))


def params():
    from rlhf_core.config import params_from_dict

    return params_from_dict({"device": "cpu", "optim": {"epochs": 2, "minibatch_size": 4, "micro_batch_size": 1,
                                                        "lr": 1e-2}, "ppo": {"target_kl": None}})


def train(model, critic_warmup_epochs: int = 0) -> dict:
    from rlhf_core.rl.algorithms.ppo import train_ppo

    return train_ppo(model, experience(), params(), temperature=1.0, pad_id=0, device=torch.device("cpu"), seed=0,
                     log=lambda *_: None, critic_warmup_epochs=critic_warmup_epochs)


def _rank(rank: int, world_size: int, init_file: str, out: str, critic_warmup_epochs: int = 0) -> None:
    import torch.distributed as dist

    from rlhf_core.runtime import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    runtime = distributed.Runtime(device=torch.device("cpu"), rank=rank, world_size=world_size, strategy="fsdp")
    distributed._CURRENT = runtime
    model = untied_actor_critic()
    metrics = train(model, critic_warmup_epochs)
    units = sorted(name for name, module in model.named_modules() if type(module).__name__.startswith("FSDP"))
    state = runtime.full_state_dict(model)
    if rank == 0:
        torch.save({"state": state, "metrics": metrics, "units": units}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.e2e  # two gloo processes: with the end-to-end tests, not in the fast default run
@pytest.mark.parametrize("critic_warmup_epochs", [0, 2])
def test_fsdp2_untied_head_is_its_own_unit_and_the_update_is_the_one_process_update(tmp_path, critic_warmup_epochs):
    """With algorithm.critic_warmup_epochs too: the value-only steps drop the sharded policy's gradients the way
    one process drops the whole ones."""
    import torch.multiprocessing as mp

    one = untied_actor_critic()
    before = {k: v.clone() for k, v in one.state_dict().items()}
    one_metrics = train(one, critic_warmup_epochs)
    out = tmp_path / "fsdp.pt"
    os.environ.setdefault("RLHF_PROGRESS", "off")
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(out), critic_warmup_epochs), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    assert result["metrics"].get("critic_warmup_steps", 0) == one_metrics.get("critic_warmup_steps", 0) == \
        critic_warmup_epochs * 2
    assert {"policy.model.embed_tokens", "policy.lm_head", "value_head", ""} <= set(result["units"])
    assert sum(name.startswith("policy.model.layers.") for name in result["units"]) == 2
    assert result["metrics"]["optimizer_steps"] == one_metrics["optimizer_steps"] == 4
    for key, value in one.state_dict().items():
        moved = (value - before[key]).abs().max().item()
        difference = (result["state"][key] - value).abs().max().item()
        assert difference <= 1e-4 * max(value.abs().max().item(), 1e-3), (key, difference, moved)
    assert result["metrics"]["grad_norm"] == pytest.approx(one_metrics["grad_norm"], rel=1e-4)
    moved = max((one.state_dict()[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3  # the round did change the weights


def train_round(model, carry, seed) -> dict:
    from rlhf_core.rl.algorithms.ppo import train_ppo

    return train_ppo(model, experience(), params(), temperature=1.0, pad_id=0, device=torch.device("cpu"), seed=seed,
                     log=lambda *_: None, carry=carry)


def _rank_carry(rank: int, world_size: int, init_file: str, workdir: str) -> None:
    """Two rounds as the optimize stage runs them under fsdp with optim.carry_state: round 1's weights and its
    gathered AdamW state go to files (rank 0), round 2 starts a fresh sharded model from them."""
    from pathlib import Path

    import torch.distributed as dist

    from rlhf_core.rl.optim import load_optimizer_state, save_optimizer_state
    from rlhf_core.runtime import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    runtime = distributed.Runtime(device=torch.device("cpu"), rank=rank, world_size=world_size, strategy="fsdp")
    distributed._CURRENT = runtime
    workdir = Path(workdir)
    model, carry = untied_actor_critic(), {}
    train_round(model, carry, seed=0)
    weights = runtime.full_state_dict(model)
    if rank == 0:
        torch.save(weights, workdir / "r1.pt")
        save_optimizer_state(workdir, carry["state"])
    dist.barrier()
    model = untied_actor_critic()
    model.load_state_dict(torch.load(workdir / "r1.pt"))
    carry = {"state": load_optimizer_state(workdir) if rank == 0 else None}  # as optimize: rank 0 reads, broadcasts
    train_round(model, carry, seed=1)
    state = runtime.full_state_dict(model)
    if rank == 0:
        torch.save({"state": state, "carried_in": carry["carried_in"]}, workdir / "r2.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.e2e  # two gloo processes
def test_fsdp2_carries_the_optimizer_state_like_one_process(tmp_path):
    """optim.carry_state under fsdp: the AdamW state gathered from the shards, saved, and sharded again gives
    round 2 the one-process update of the same optimizer carried in memory."""
    import torch.multiprocessing as mp

    one, carry = untied_actor_critic(), {}
    train_round(one, carry, seed=0)
    train_round(one, carry, seed=1)
    fresh = untied_actor_critic()
    train_round(fresh, {}, seed=0)
    train_round(fresh, None, seed=1)
    os.environ.setdefault("RLHF_PROGRESS", "off")
    mp.spawn(_rank_carry, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "r2.pt", weights_only=False)
    assert result["carried_in"] is True
    for key, value in one.state_dict().items():
        difference = (result["state"][key] - value).abs().max().item()
        assert difference <= 1e-4 * max(value.abs().max().item(), 1e-3), (key, difference)
    gap = max((one.state_dict()[k] - fresh.state_dict()[k]).abs().max().item() for k in one.state_dict())
    assert gap > 1e-3  # carrying the state changes round 2: the check above could not pass by accident


def test_a_meta_load_builds_the_same_modules_with_no_weights(tiny_checkpoint, tmp_path):
    """load_actor_critic on the meta device (what fsdp ranks other than 0 do): the parameter names, shapes and
    dtypes of a real load, every one of them a meta tensor (no storage: nothing was read into it), for a full
    model, new LoRA adapters with a separate critic, and a LoRA checkpoint of a later round."""
    from rlhf_core.config import params_from_dict
    from rlhf_core.model.checkpoints import load_actor_critic
    from rlhf_core.model.loading import load_tokenizer
    from rlhf_core.model.lora import trainable_lora_policy

    lora = params_from_dict({"lora": {"enabled": True, "r": 4}}).lora
    adapters = tmp_path / "r1"  # a LoRA round's checkpoint: adapters on the tiny base
    trainable_lora_policy(str(tiny_checkpoint), lora, torch.device("cpu")).save_pretrained(adapters)
    load_tokenizer(str(tiny_checkpoint)).save_pretrained(adapters)
    for path, critic, lora_params in ((tiny_checkpoint, "value_head", None), (tiny_checkpoint, "separate", lora),
                                      (adapters, "value_head", lora)):
        real = load_actor_critic(str(path), critic, torch.device("cpu"), lora=lora_params)
        empty = load_actor_critic(str(path), critic, torch.device("meta"), lora=lora_params)
        assert [(n, p.shape, p.dtype) for n, p in empty.named_parameters()] == \
            [(n, p.shape, p.dtype) for n, p in real.named_parameters()], (path, critic)
        assert all(p.is_meta for p in empty.parameters())
        assert [n for n, p in empty.named_parameters() if p.requires_grad] == \
            [n for n, p in real.named_parameters() if p.requires_grad]


def _rank_from_meta(rank: int, world_size: int, init_file: str, out: str) -> None:
    """Rank 0 holds a bf16 policy (as ``param_dtype: auto`` loads a bf16 checkpoint); rank 1 builds the structure on
    the meta device in float32, as its from_config would: shard_fsdp2_from_rank0 gives it rank 0's dtypes and
    weights, buffers included."""
    import torch.distributed as dist

    from rlhf_core.runtime import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    runtime = distributed.Runtime(device=torch.device("cpu"), rank=rank, world_size=world_size, strategy="fsdp")
    distributed._CURRENT = runtime
    if rank == 0:
        model = untied_actor_critic()
        model.policy.to(torch.bfloat16)
    else:
        with torch.device("meta"):
            model = untied_actor_critic()
    metrics = train(model)
    state = runtime.full_state_dict(model)
    if rank == 0:
        torch.save({"state": state, "metrics": metrics}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.e2e  # two gloo processes
def test_fsdp2_fills_a_meta_rank_from_rank_0_with_rank_0_dtypes(tmp_path):
    import torch.multiprocessing as mp

    one = untied_actor_critic()
    one.policy.to(torch.bfloat16)
    before = {k: v.float().clone() for k, v in one.state_dict().items()}
    one_metrics = train(one)
    os.environ.setdefault("RLHF_PROGRESS", "off")
    mp.spawn(_rank_from_meta, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    assert {key: value.dtype for key, value in result["state"].items()} == \
        {key: value.dtype for key, value in one.state_dict().items()}

    def update(state):
        return torch.cat([(state[key].float() - before[key]).flatten() for key in sorted(before)])

    # the same bf16 update up to rounding; a rank left with garbage or zeros would be far off
    assert update(one.state_dict()).norm() > 1e-2
    assert (update(result["state"]) - update(one.state_dict())).norm() / update(one.state_dict()).norm() < 0.15
    assert result["metrics"]["grad_norm"] == pytest.approx(one_metrics["grad_norm"], rel=2e-2)
