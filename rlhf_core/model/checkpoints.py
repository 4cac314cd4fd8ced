"""Checkpoints: a policy (full weights or LoRA adapters) with its value head or separate critic, loaded
and saved (``models/<round>``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rlhf_core.errors import ConfigError
from rlhf_core.io import STATE_FILE, checkpoint_dir
from rlhf_core.model.forward import ActorCritic, ValueHead
from rlhf_core.model.loading import (
    ADAPTER_CONFIG_FILE,
    adapter_base,
    disable_dropout,
    hidden_size_of,
    is_adapter_checkpoint,
    load_causal_lm,
    quiet_transformers,
    safe_from_pretrained,
)
from rlhf_core.model.lora import trainable_lora_policy

VALUE_HEAD_FILE = "value_head.safetensors"


CRITIC_DIR = "critic"


def load_actor_critic(path: str, critic: str, device: torch.device, trust_remote_code: bool = False,
                      lora=None, param_dtype: str = "float32", critic_init: str | None = None) -> ActorCritic:
    """Policy and critic from a checkpoint directory (or any causal LM, whose critic starts at V=0).

    ``lora`` (the lora params, for training): enabled → the policy trains LoRA adapters only
    (``trainable_lora_policy``); disabled → an adapter checkpoint is merged into a full model that trains
    whole.  None (rollout, evaluation): the checkpoint as it is, adapters unmerged.
    ``param_dtype`` (compute.param_dtype): the policy's and the critic backbone's weights; the value head
    is always float32 (it reads the last hidden state cast to float32).
    ``critic_init`` (algorithm.critic_init, critic ``separate``): models/sft (the default: the SFT backbone, V=0),
    or a reward model's directory whose backbone and score head become the critic when the checkpoint has none
    yet (round 1, from sft), so that V(s) at the last token starts as the reward model's score (as TRL's PPO
    starts its value model).
    ``device`` meta: the same modules with no weights read (FSDP2 ranks other than 0; ``safe_from_pretrained``)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    if lora is not None and lora.enabled:
        policy = trainable_lora_policy(path, lora, device, trust_remote_code, param_dtype)
    else:
        policy = load_causal_lm(path, device, trust_remote_code, merge_adapters=lora is not None,
                                param_dtype=param_dtype)
    hidden_size = hidden_size_of(policy.config)
    value_head = ValueHead(hidden_size)
    critic_backbone = None
    if critic == "separate":
        critic_dir = Path(path) / CRITIC_DIR
        if not critic_dir.is_dir() and critic_init and Path(critic_init).resolve() != Path(checkpoint_dir("sft")).resolve():
            critic_backbone, head = critic_from_reward_model(critic_init, policy.config, trust_remote_code, param_dtype,
                                                             empty=device.type == "meta", device=device)
            if device.type != "meta":  # a meta score head has no values to copy
                value_head.load_state_dict(head)
            return ActorCritic(policy, value_head.to(device), disable_dropout(critic_backbone).to(device))
        source = str(critic_dir) if critic_dir.is_dir() else adapter_base(path) if is_adapter_checkpoint(path) else path
        critic_backbone = disable_dropout(safe_from_pretrained(AutoModel, source, trust_remote_code,
                                                               param_dtype=param_dtype, device=device,
                                                               empty=device.type == "meta")).to(device)
        head_file = critic_dir / VALUE_HEAD_FILE
    else:
        head_file = Path(path) / VALUE_HEAD_FILE
    if head_file.is_file():
        value_head.load_state_dict(load_file(str(head_file)))
    return ActorCritic(policy, value_head.to(device), critic_backbone)


def critic_from_reward_model(path: str, policy_config, trust_remote_code: bool = False, param_dtype: str = "float32",
                             empty: bool = False, device=None):
    """(backbone, value-head state) from a one-output decoder reward model at ``path`` (a ``*ForSequenceClassification``
    with a linear ``score`` head that reads the last token, as transformers' decoder classifiers do).  Its
    vocabulary must be the policy's: the critic reads the policy's token ids."""
    from transformers import AutoModelForSequenceClassification

    model = safe_from_pretrained(AutoModelForSequenceClassification, path, trust_remote_code, param_dtype=param_dtype,
                                 empty=empty, device=device)
    score = getattr(model, "score", None)
    if not isinstance(score, nn.Linear) or score.out_features != 1:
        raise ConfigError(f"algorithm.critic_init: {path} is a {type(model).__name__}; a critic starts from a one-output "
                          "decoder reward model with a linear `score` head (e.g. LlamaForSequenceClassification)")
    if hidden_size_of(model.config) != hidden_size_of(policy_config):
        raise ConfigError(f"algorithm.critic_init: {path} has hidden size {hidden_size_of(model.config)}, the policy "
                          f"{hidden_size_of(policy_config)}: the value head must fit both (train the reward model with "
                          "base: sft)")
    if model.config.vocab_size != policy_config.vocab_size:
        raise ConfigError(f"algorithm.critic_init: {path} has a vocabulary of {model.config.vocab_size} tokens, the policy "
                          f"{policy_config.vocab_size}: a critic must read the policy's tokens (train the reward model "
                          "with base: sft)")
    head = {"summary.weight": score.weight.detach().float().clone(),
            "summary.bias": (score.bias.detach().float().clone() if score.bias is not None else torch.zeros(1))}
    return getattr(model, model.base_model_prefix), head


def _share_tied_tensors(module: nn.Module, state: dict) -> dict:
    """``state`` (a gathered copy of ``module``'s weights) with one tensor under every name of a tied parameter
    (the LM head and the input embeddings with ``tie_word_embeddings``), as ``module.state_dict()`` has it:
    save_pretrained then writes it once, as it does for the module's own weights."""
    first_name: dict[int, str] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if name in state:
            if id(parameter) in first_name:
                state[name] = state[first_name[id(parameter)]]
            else:
                first_name[id(parameter)] = name
    return state


def save_checkpoint(directory: Path, model: ActorCritic, tokenizer, state: dict, state_dict: dict | None = None) -> None:
    """save_pretrained policy + tokenizer (plain transformers loads them), the critic, and the RL state.

    ``state_dict``: the ActorCritic's full state dict when the weights of ``model`` are sharded across
    processes (fsdp: gathered by ``Runtime.full_state_dict``); None saves ``model``'s own."""
    from safetensors.torch import save_file

    def part(prefix):
        if state_dict is None:
            return None
        state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        module = model.get_submodule(prefix.rstrip(".")) if prefix else model
        return _share_tied_tensors(module, state)

    quiet_transformers()
    model.policy.save_pretrained(directory, state_dict=part("policy."))
    if (directory / ADAPTER_CONFIG_FILE).is_file():  # LoRA: adapters only; drop the model card peft writes
        (directory / "README.md").unlink(missing_ok=True)
    tokenizer.save_pretrained(directory)
    head_dir = directory
    if model.critic_backbone is not None:
        head_dir = directory / CRITIC_DIR
        model.critic_backbone.save_pretrained(head_dir, state_dict=part("critic_backbone."))
    head_state = part("value_head.") or model.value_head.state_dict()
    head_state = {k: v.detach().cpu().contiguous() for k, v in head_state.items()}
    save_file(head_state, str(head_dir / VALUE_HEAD_FILE))
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
