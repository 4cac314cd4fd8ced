"""compute.strategy: deepspeed: the config handed to deepspeed.initialize, what is refused in one line, and (with
2 gloo processes, in the e2e run) an early stop that comes before ZeRO's step.

The stage-level runs (the one-process update under ZeRO-2 and ZeRO-3, LoRA, bf16 weights, gradient
checkpointing, `dvc repro`) are in tests/test_distributed.py and tests/e2e/test_distributed_pipeline.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_fsdp import experience, untied_actor_critic

from rlhf_core.runtime.distributed import leave_process

pytest.importorskip("deepspeed")  # in requirements.lock; a bare `pip install -e .` may not have it


def test_the_deepspeed_config_needs_no_dataloader_and_clips_at_optim_max_grad_norm():
    from rlhf_core.runtime.distributed import deepspeed_config

    config = deepspeed_config(3, micro_batch_size=4, world_size=2, max_grad_norm=0.5, hidden_size=64)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 1
    assert config["train_batch_size"] == 8  # = micro × accumulation × world, as DeepSpeed checks; never "auto"
    assert config["gradient_clipping"] == 0.5
    # buckets from the hidden size, as transformers' Trainer sizes DeepSpeed's "auto" (never DeepSpeed's 5e8)
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 4096, "stage3_prefetch_bucket_size": 3686,
                                           "stage3_param_persistence_threshold": 640}
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}  # nothing cast
    zero2 = deepspeed_config(2, 1, 4, None, hidden_size=64)
    assert zero2["gradient_clipping"] == 0.0  # optim.max_grad_norm: null is DeepSpeed's off
    assert zero2["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 4096, "allgather_bucket_size": 4096}


def test_deepspeed_params_are_checked():
    from rlhf_core.config import params_from_dict
    from rlhf_core.errors import ConfigError

    params = params_from_dict({"device": "cpu", "compute": {"num_processes": 2, "strategy": "deepspeed",
                                                            "zero_stage": 3}})
    assert params.compute.zero_stage == 3
    with pytest.raises(ConfigError, match=r"^compute.zero_stage = 3: only read with compute.strategy = 'deepspeed' "
                                          r"\(got 'fsdp'\)"):
        params_from_dict({"compute": {"num_processes": 2, "strategy": "fsdp", "zero_stage": 3}})
    with pytest.raises(ConfigError, match=r"^compute.zero_stage = 1: must be one of 2, 3"):
        params_from_dict({"compute": {"strategy": "deepspeed", "zero_stage": 1}})
    with pytest.raises(ConfigError, match=r"^compute.mixed_precision = 'fp16': not supported with compute.strategy = "
                                          r"'deepspeed'"):
        params_from_dict({"compute": {"num_processes": 2, "strategy": "deepspeed", "mixed_precision": "fp16"}})
    two = {"strategy": "deepspeed", "num_processes": 2}
    with pytest.raises(ConfigError, match=r"^optim.carry_state = True: not supported with compute.strategy = "
                                          r"'deepspeed' \(the AdamW state is kept as ZeRO's flat partitions"):
        params_from_dict({"compute": two, "optim": {"carry_state": True}})
    with pytest.raises(ConfigError, match=r"^algorithm.critic_warmup_epochs = 2: not supported with "
                                          r"compute.strategy = 'deepspeed'"):
        params_from_dict({"compute": two, "algorithm": {"critic_warmup_epochs": 2}})
    # one process runs no ZeRO: nothing to refuse
    params_from_dict({"compute": {"strategy": "deepspeed"}, "optim": {"carry_state": True}})
    with pytest.raises(ConfigError, match=r"^compute.zero_stage = 3: needs every weight in one dtype, and with "
                                          r"param_dtype bfloat16 the value head stays float32"):
        params_from_dict({"compute": {**two, "zero_stage": 3, "param_dtype": "bfloat16"}})


def test_zero3_refuses_weights_of_two_dtypes_in_one_line():
    """ZeRO-3 packs every partition into one buffer; bf16 weights with the float32 value head would fail deep in
    DeepSpeed with a bare AssertionError.  The check comes before any collective, so one process shows it."""
    from rlhf_core.errors import ConfigError
    from rlhf_core.runtime.distributed import Runtime

    model = untied_actor_critic()
    model.policy.to(torch.bfloat16)
    runtime = Runtime(device=torch.device("cpu"), rank=0, world_size=2, strategy="deepspeed", zero_stage=3)
    with pytest.raises(ConfigError, match=r"^compute.zero_stage = 3: needs every weight in one dtype, got bfloat16 "
                                          r"and float32 \(the value head stays float32\); set compute.param_dtype: "
                                          r"float32 with compute.mixed_precision: bf16"):
        runtime.prepare(model, lambda trainable: (torch.optim.AdamW(trainable), None))


def test_without_deepspeed_the_strategy_stops_in_one_line(monkeypatch):
    import importlib.util

    from rlhf_core.errors import ConfigError
    from rlhf_core.runtime.distributed import require_deepspeed

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^compute.strategy = 'deepspeed': deepspeed is not installed; "):
        require_deepspeed()


def early_stop_params():
    from rlhf_core.config import params_from_dict

    # approx-KL to the experience's made-up old log-probs: 0.013 on the first minibatch, past 0.02 on the second
    return params_from_dict({"device": "cpu", "optim": {"epochs": 2, "minibatch_size": 4, "micro_batch_size": 1,
                                                        "lr": 1e-2}, "ppo": {"target_kl": 0.02}})


def train_until_stop(model) -> dict:
    from rlhf_core.rl.algorithms.ppo import train_ppo

    return train_ppo(model, experience(), early_stop_params(), temperature=1.0, pad_id=0,
                     device=torch.device("cpu"), seed=0, log=lambda *_: None)


def join_zero(rank: int, world_size: int, init_file: str, zero_stage: int):
    """In a spawned process: join the gloo group as ``rank`` and make the current runtime a DeepSpeed one."""
    import torch.distributed as dist

    from rlhf_core.runtime import distributed

    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # what accelerate launch sets, and DeepSpeed checks
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    runtime = distributed.Runtime(device=torch.device("cpu"), rank=rank, world_size=world_size, strategy="deepspeed",
                                  zero_stage=zero_stage)
    distributed._CURRENT = runtime
    return runtime


def bf16_policy(model):
    model.policy.to(torch.bfloat16)
    return model


def train_bf16_round(model) -> dict:
    from test_fsdp import params

    from rlhf_core.rl.algorithms.ppo import train_ppo

    return train_ppo(model, experience(), params(), temperature=1.0, pad_id=0, device=torch.device("cpu"), seed=0,
                     log=lambda *_: None)


def _rank_bf16(rank: int, world_size: int, init_file: str, out: str) -> None:
    runtime = join_zero(rank, world_size, init_file, zero_stage=2)
    model = bf16_policy(untied_actor_critic())
    train_bf16_round(model)
    if rank == 0:
        torch.save({key: value.clone() for key, value in model.value_head.state_dict().items()}, out)
    runtime.close()
    leave_process()  # as run_stage ends a rank: the interpreter's teardown can abort after ZeRO


@pytest.mark.e2e  # two gloo processes
def test_zero2_trains_the_float32_value_head_beside_bf16_weights_as_one_process_does(tmp_path):
    """bf16 weights and the float32 value head are two param groups (optim.make_optimizer), so ZeRO-2 flattens each
    in its own dtype: the head's update is one process's to float32 precision, not rounded to bf16."""
    import torch.multiprocessing as mp

    one = bf16_policy(untied_actor_critic())
    before = one.value_head.summary.weight.detach().clone()
    train_bf16_round(one)
    os.environ.setdefault("RLHF_PROGRESS", "off")
    mp.spawn(_rank_bf16, args=(2, str(tmp_path / "init"), str(tmp_path / "head.pt")), nprocs=2, join=True)
    got, want = torch.load(tmp_path / "head.pt")["summary.weight"], one.value_head.summary.weight.detach()
    assert got.dtype == torch.float32 and not torch.equal(got.bfloat16().float(), got)
    assert (want - before).abs().max() > 1e-3  # the head did train
    assert (got - want).abs().max() / want.abs().max() < 1e-2  # measured 1.2e-3 (the backbone's bf16 rounding)


def _rank(rank: int, world_size: int, init_file: str, out: str, zero_stage: int) -> None:
    runtime = join_zero(rank, world_size, init_file, zero_stage)
    model = untied_actor_critic()
    metrics = train_until_stop(model)
    state = runtime.full_state_dict(model) or model.state_dict()  # ZeRO-2: every rank holds the whole weights
    if rank == 0:
        torch.save({"state": {key: value.clone() for key, value in state.items()}, "metrics": metrics}, out)
    runtime.close()
    leave_process()  # as run_stage ends a rank: the interpreter's teardown can abort after ZeRO


def _rank_grpo(rank: int, world_size: int, init_file: str, out: str) -> None:
    from rlhf_core.config import params_from_dict
    from rlhf_core.rl.algorithms.train import train_round

    runtime = join_zero(rank, world_size, init_file, zero_stage=2)
    model = untied_actor_critic()
    head = {key: value.clone() for key, value in model.value_head.state_dict().items()}
    params = params_from_dict({"device": "cpu", "algorithm": {"name": "grpo"},
                               "optim": {"epochs": 1, "minibatch_size": 4, "micro_batch_size": 1, "lr": 1e-2,
                                         "weight_decay": 0.1}})
    train_round(model, experience(), params, temperature=1.0, pad_id=0, device=torch.device("cpu"), seed=0,
                log=lambda *_: None)
    if rank == 0:
        torch.save({"before": head, "after": model.value_head.state_dict()}, out)
    runtime.close()
    leave_process()  # as run_stage ends a rank: the interpreter's teardown can abort after ZeRO


@pytest.mark.e2e  # two gloo processes
def test_zero_leaves_an_unused_value_head_alone(tmp_path):
    """grpo trains no critic: AdamW skips the value head, which gets no gradient; ZeRO would zero-fill its gradient
    and decay it.  Under deepspeed it is kept out of the optimizer, so it ends the round as it began."""
    import torch.multiprocessing as mp

    os.environ.setdefault("RLHF_PROGRESS", "off")
    mp.spawn(_rank_grpo, args=(2, str(tmp_path / "init"), str(tmp_path / "head.pt")), nprocs=2, join=True)
    heads = torch.load(tmp_path / "head.pt", weights_only=False)
    assert heads["before"]["summary.weight"].abs().max() > 0  # a non-zero head, which weight decay would shrink
    for key, value in heads["before"].items():
        assert torch.equal(heads["after"][key], value), key


@pytest.mark.e2e  # two gloo processes
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_early_stop_comes_before_the_step(tmp_path, zero_stage):
    """ppo.target_kl stops the round on the second minibatch, whose gradient is already accumulated in ZeRO's
    buffers: it must not be stepped (accelerate's integration stepped inside backward, before the check).  The
    weights are the one-process weights after exactly one step."""
    import torch.multiprocessing as mp

    one = untied_actor_critic()
    before = {key: value.clone() for key, value in one.state_dict().items()}
    one_metrics = train_until_stop(one)
    assert one_metrics["early_stopped"] and one_metrics["optimizer_steps"] == 1
    os.environ.setdefault("RLHF_PROGRESS", "off")
    out = tmp_path / "zero.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(out), zero_stage), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    assert result["metrics"]["early_stopped"] and result["metrics"]["optimizer_steps"] == 1
    for key, value in one.state_dict().items():
        difference = (result["state"][key] - value).abs().max().item()
        assert difference <= 1e-4 * max(value.abs().max().item(), 1e-3), (key, difference)
    assert max((one.state_dict()[key] - before[key]).abs().max().item() for key in before) > 1e-3  # one real step
