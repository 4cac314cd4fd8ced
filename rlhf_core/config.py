"""The typed params tree: the only reader of params.yaml.

Every knob of the pipeline is a field of a dataclass below, with its type, its
default, its allowed range and one line of documentation.  ``load_params``
parses params.yaml, rejects unknown keys, wrong types and out-of-range values
with one line that names the key and what is allowed, and returns a frozen
``Params`` tree.  It imports nothing heavy, so a stage validates its params
before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from rlhf_core.errors import ConfigError


def param(default: Any, doc: str, *, ge=None, gt=None, le=None, lt=None, pattern: str | None = None):
    """A documented field with optional numeric bounds (ge/gt/le/lt) or a regex for strings."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "pattern": pattern}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, doc: str):
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass(frozen=True)
class ComputeParams:
    num_processes: int = param(
        1, "processes of the rollout and optimize stages on each machine: 1 (on one machine) runs them in process as "
        "plain python; more go through `accelerate launch` (one process per GPU, or gloo processes on CPU): prompts "
        "are sharded, gradients summed", ge=1)
    rollout_processes: Optional[int] = param(
        None, "processes of the rollout stage on each machine when it should differ from num_processes (null: the "
        "same), e.g. 1 for vLLM generation (one engine) while optimize trains on num_processes GPUs; the samples do not "
        "depend on it", ge=1)
    num_machines: int = param(
        1, "machines that run rollout and optimize together (num_processes on each); more than 1 needs the repository "
        "on a filesystem every machine mounts at the same path, and `python -m rlhf_core.launch --follow` running on "
        "every other machine (docs/scaling.md: Several machines)", ge=1)
    main_process_ip: str = param(
        "", "address of machine 0 (where `dvc repro` runs) for the rendezvous when num_machines > 1; empty: the "
        "environment's MASTER_ADDR")
    main_process_port: int = param(
        0, "TCP port of the rendezvous on machine 0; 0: a free port on one machine, the environment's MASTER_PORT "
        "on several", ge=0, le=65535)
    @property
    def rollout_process_count(self) -> int:
        """Processes of the rollout stage on each machine: rollout_processes, or num_processes when it is null."""
        return self.num_processes if self.rollout_processes is None else self.rollout_processes

    mixed_precision: Literal["no", "bf16", "fp16"] = param(
        "no", "autocast dtype of the forward passes: no (float32), bf16, or fp16 (GPU only; the loss is scaled)")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = param(
        "ddp", "how the optimize stage's processes hold the model when num_processes > 1: ddp (a full replica each), "
        "fsdp (FSDP2 fully_shard: parameters, gradients and optimizer state sharded per transformer block; CPU or GPU); "
        "deepspeed is refused until it has run; rollout keeps a full replica per process")
    param_dtype: Literal["float32", "bfloat16", "auto"] = param(
        "auto", "dtype of the weights of the policy, the reference and a separate critic backbone, as loaded in "
        "sft, rollout, optimize and evaluate (and so as saved): auto = the checkpoint's own dtype (float32 for the "
        "from-scratch default, bfloat16 for most Hub models); float32; bfloat16 (half the memory of the weights, "
        "their gradients and AdamW's state, with no float32 master copy: an update smaller than ~1/256 of a weight "
        "rounds away, so it suits large models and LoRA more than tiny ones). "
        "The value head, log-softmax, ratios, KL and advantages stay float32")
    gradient_checkpointing: bool = param(
        False, "recompute each transformer block's activations in the backward pass of sft, optimize and "
        "train_reward instead of keeping them: activation memory of about one block instead of all, for about "
        "one more forward pass of compute; the same gradients")
    warm_start: bool = param(
        True, "fork one-process CPU stages from a local server that has already imported torch and transformers "
        "(rlhf_core/warm.py), instead of paying ~7 s of imports in every stage; false starts each stage cold")


@dataclass(frozen=True)
class PrepareParams:
    source: Literal["builtin", "file", "hf"] = param(
        "builtin", "where prompts come from: the task's built-in generator, a local jsonl/parquet/csv file, or a `datasets` dataset")
    path: str = param("", "file path (source: file) or dataset name or local dataset directory (source: hf)")
    dataset_config: str = param("", "`datasets` configuration name (source: hf); empty for none")
    split: str = param("train", "`datasets` split to read (source: hf)")
    prompt_field: str = param("prompt", "column holding the prompt: text, or a list of {role, content} messages (trailing assistant turns are dropped; needs a chat template)")
    answer_field: str = param("", "optional column with a reference answer, kept for verifiable scorers; empty for none")
    num_builtin_prompts: int = param(1200, "how many prompts the built-in generator draws before deduplication", ge=2)
    max_prompt_chars: int = param(200, "prompts longer than this many characters are dropped or truncated", ge=1)
    too_long: Literal["drop", "truncate"] = param("drop", "what to do with a prompt longer than max_prompt_chars")
    eval_fraction: float = param(0.1, "fraction of the deduplicated prompts held out for evaluation", gt=0.0, lt=1.0)


@dataclass(frozen=True)
class ChatParams:
    template: Literal["auto", "on", "off"] = param(
        "auto", "render prompts with the policy tokenizer's chat template (add_generation_prompt): `auto` when the tokenizer has one (instruct models), `on` requires one, `off` feeds raw text; the from-scratch default has none")
    system_prompt: str = param("", "a system turn opening every templated conversation (one of its own in a messages prompt wins); empty: none")


@dataclass(frozen=True)
class TinyModelParams:
    architecture: Literal["llama", "gpt2"] = param("llama", "transformers architecture of the from-scratch model")
    vocab_size: int = param(768, "byte-level BPE vocabulary size, special tokens included", ge=300)
    hidden_size: int = param(128, "width of the residual stream", ge=8)
    num_layers: int = param(4, "number of transformer blocks", ge=1)
    num_heads: int = param(4, "attention heads per block (must divide hidden_size)", ge=1)
    intermediate_size: int = param(384, "width of the MLP", ge=8)
    max_positions: int = param(128, "longest sequence the model can see", ge=16)


@dataclass(frozen=True)
class SFTParams:
    model: str = param("builtin", "`builtin` trains a tiny model and tokenizer from scratch; otherwise any AutoModelForCausalLM hub id or local directory")
    tiny: TinyModelParams = section(TinyModelParams, "shape of the from-scratch model (model: builtin)")
    demonstrations: Literal["builtin", "file", "hf"] = param(
        "builtin", "where demonstrations come from: the task's generator, a local jsonl/parquet/csv file, or a `datasets` dataset")
    demo_path: str = param("", "file path or dataset name of the demonstrations (demonstrations: file or hf)")
    demo_dataset_config: str = param("", "`datasets` configuration name of the demonstrations; empty for none")
    demo_split: str = param("train", "`datasets` split of the demonstrations")
    demo_prompt_field: str = param("prompt", "column with the demonstration prompt; empty: demo_response_field is plain text whose first demo_prompt_chars characters are the prompt")
    demo_prompt_chars: int = param(64, "prompt length in characters (cut at a word boundary) when demo_prompt_field is empty", ge=1)
    demo_response_field: str = param("response", "column with the demonstration response")
    num_builtin_demonstrations: int = param(6000, "how many demonstrations the built-in generator writes", ge=10)
    heldout_fraction: float = param(0.05, "fraction of demonstrations held out for the perplexity metric", gt=0.0, lt=1.0)
    epochs: int = param(3, "passes over the demonstrations; 0 snapshots the model as it is", ge=0)
    lr: float = param(3e-3, "peak AdamW learning rate", gt=0.0)
    weight_decay: float = param(0.01, "AdamW weight decay", ge=0.0)
    warmup_ratio: float = param(0.05, "fraction of steps spent warming the learning rate up", ge=0.0, lt=1.0)
    batch_size: int = param(64, "sequences per optimizer step", ge=1)
    micro_batch_size: int = param(64, "sequences per forward/backward pass (gradient accumulation over a step's rows, grouped by length): sets peak memory, not the update; lower it for large models (on the tiny default one pass is fastest)", ge=1)
    max_length: int = param(64, "demonstrations are truncated to this many tokens", ge=4)
    completion_only_loss: bool = param(False, "train only on response tokens instead of the whole text")


@dataclass(frozen=True)
class RolloutParams:
    prompts_per_round: int = param(64, "train prompts sampled per round", ge=1)
    samples_per_prompt: int = param(4, "responses generated per prompt", ge=1)
    temperature: float = param(1.0, "sampling temperature; log-probs everywhere use the same scaling", gt=0.0)
    top_p: float = param(1.0, "nucleus sampling mass; 1.0 samples the plain softmax (below 1 the data is off-policy)", gt=0.0, le=1.0)
    top_k: int = param(0, "top-k sampling; 0 disables (non-zero makes the data off-policy)", ge=0)
    max_new_tokens: int = param(24, "longest response in tokens; generation stops earlier at EOS", ge=1)
    batch_size: int = param(128, "sequences generated per batch", ge=1)
    forward_batch_size: int = param(64, "sequences per forward pass when recording log-probs and values", ge=1)
    engine: Literal["hf", "vllm"] = param(
        "hf", "generation engine: hf = transformers generate (batched, KV-cached); vllm = vLLM's engine on GPU "
        "(pip install vllm), loading the round's checkpoint from disk; log-probs and values are still recomputed "
        "by the training forward pass")
    gpu_memory_fraction: float = param(
        0.6, "engine: vllm: fraction of the GPU's memory vLLM reserves for its weights and KV cache; the HF models "
        "that record log-probs load after vLLM has shut down", gt=0.0, lt=1.0)


SCORER_KINDS = ("task", "vader", "length", "verifiable", "python", "hf_classifier")
_IDENTIFIER = r"^[A-Za-z][A-Za-z0-9_]*$"
_DEVICE = r"^(auto|cpu|cuda(:\d+)?|mps)$"


@dataclass(frozen=True)
class ScorerParams:
    name: str = param("task", "component name: its column in scores/<round>, its eval metric reward_<name>", pattern=_IDENTIFIER)
    kind: Literal["task", "vader", "length", "verifiable", "python", "hf_classifier"] = param(
        "task", "task: the built-in task's own reward (sentiment: VADER; arithmetic: exact match with the answer); vader: VADER compound sentiment of the response; length: −|tokens − target_length| / target_length; verifiable: 1 if the response matches the prompt's reference answer, else 0; python: your function; hf_classifier: an AutoModelForSequenceClassification (reward model)")
    weight: float = param(1.0, "weight of this component in the total reward; 0 keeps it as a monitored column only")
    normalize: Literal["none", "batch", "running"] = param(
        "none", "per-component normalisation before weighting: none, whitening over the round, or a running mean/std across rounds")
    clip: Optional[float] = param(None, "clip the (normalised) component to [−clip, clip]; null disables", gt=0.0)
    target_length: int = param(16, "length: the response length in tokens that scores 0 (the maximum)", ge=1)
    match: Literal["exact", "numeric", "regex"] = param(
        "exact", "verifiable: exact (stripped) string match, numeric match within tolerance, or the reference answer as a regex searched in the response")
    tolerance: float = param(1e-6, "verifiable numeric: largest accepted |response number − answer|", ge=0.0)
    function: str = param("", "python: `module:function` called as f(prompts, responses, metadata) -> one float per response")
    model: tuple = param(
        (), "hf_classifier: hub id or local directory of an AutoModelForSequenceClassification (e.g. reward_models/<name>); a list of several is an ensemble")
    ensemble: Literal["mean", "min"] = param("mean", "hf_classifier with several models: combine their scores by mean, or by min (pessimistic, curbs reward hacking)")
    label: str = param("", "hf_classifier: the output scored: empty for a one-output reward model, else a label name of the model's id2label or an index")
    output: Literal["logit", "probability"] = param("logit", "hf_classifier: the label's raw logit, or its softmax probability")
    text: Literal["prompt_and_response", "response", "conversation"] = param("prompt_and_response", "hf_classifier: what the classifier reads, re-tokenised with its own tokenizer: the plain prompt + response, the response alone, or (chat reward models) a user turn and the assistant's answer rendered by the classifier's own chat template")
    batch_size: int = param(32, "hf_classifier: texts per forward pass", ge=1)
    max_length: int = param(512, "hf_classifier: longest input in the classifier's tokens; longer texts keep their end", ge=2)
    device: str = param("auto", "hf_classifier: `auto`, `cpu`, `cuda`, `cuda:N` or `mps`", pattern=_DEVICE)
    allow_untrained_head: bool = param(
        False, "hf_classifier: accept a checkpoint that lacks some of the classifier's weights (a sentence encoder or "
        "a plain LM: transformers would start its head at random, so its scores are noise); off: refused in one line")


@dataclass(frozen=True)
class ScoreParams:
    scorers: tuple = field(
        default_factory=lambda: (ScorerParams(),),
        metadata={"doc": "reward components; the total is Σ weight · normalise(component), plus the missing-EOS penalty"})
    missing_eos_penalty: float = param(0.0, "subtracted from the total of a response that hit max_new_tokens without EOS", ge=0.0)


@dataclass(frozen=True)
class AdvantagesParams:
    gamma: float = param(1.0, "discount γ of the token-level MDP", ge=0.0, le=1.0)
    lam: float = param(0.95, "GAE λ", ge=0.0, le=1.0)
    kl_estimator: Literal["k1", "k3"] = param("k1", "per-token KL(π_old‖π_ref) estimator in the reward: k1 = log π − log π_ref, k3 = (r−1) − log r with r = π_ref/π")
    kl_coef: float = param(0.05, "β: initial (or fixed) weight of the KL penalty", ge=0.0)
    adaptive_kl: bool = param(False, "adapt β each round towards kl_target (Ziegler et al. 2019)")
    kl_target: float = param(6.0, "target sequence KL of the adaptive controller", gt=0.0)
    kl_horizon: int = param(10000, "horizon of the adaptive controller, in samples", ge=1)
    whiten_rewards: bool = param(False, "whiten the per-token rewards over the round before GAE")
    whiten_advantages: bool = param(True, "whiten the advantages over the round")


ALGORITHMS = ("reinforce", "a2c", "ppo", "trpo", "npg", "grpo", "rloo")


@dataclass(frozen=True)
class AlgorithmParams:
    name: Literal["reinforce", "a2c", "ppo", "trpo", "npg", "grpo", "rloo"] = param(
        "ppo", "policy optimizer: reinforce, a2c (REINFORCE with a learned value and GAE), ppo, trpo, npg (natural gradient), grpo or rloo")
    critic: Literal["value_head", "separate"] = param(
        "value_head", "critic: a value head on the policy backbone, or a separate backbone with its own head")


@dataclass(frozen=True)
class LoraParams:
    enabled: bool = param(False, "optimize trains LoRA adapters (peft) instead of every weight: checkpoints hold the adapters, pointing at models/sft as their base, plus the value head; the reference is the base with the adapters disabled (no second copy)")
    r: int = param(8, "rank of the adapters", ge=1)
    lr_scale: float = param(10.0, "the adapters learn at ppo.lr × lr_scale (the value head at ppo.lr): LoRA's best learning rate is about 10× full fine-tuning's (Schulman et al. 2025, LoRA Without Regret); at 1 the default task barely moves", gt=0.0)
    alpha: float = param(16.0, "LoRA scaling numerator: the update is (alpha / r)·B·A", gt=0.0)
    dropout: float = param(0.0, "dropout on the adapters' input during optimize's updates (rollout and π_old log-probs have none, so above 0 the first PPO ratio is no longer exactly 1)", ge=0.0, lt=1.0)
    target_modules: str = param("all-linear", "modules that get adapters: `all-linear` (every linear layer but the LM head) or comma-separated module names, e.g. q_proj,v_proj")


@dataclass(frozen=True)
class ReinforceParams:
    return_type: Literal["sequence", "reward_to_go"] = param(
        "sequence", "G for every token: the whole sequence's return, or the token-level reward-to-go Σ_{t'≥t} γ^{t'−t} r_t'")
    baseline: Literal["none", "moving_average", "leave_one_out", "value"] = param(
        "moving_average", "b subtracted from G: none, a moving average of past mean returns (carried across rounds), the mean of the other samples of the prompt, or a learned value (= a2c, GAE advantages)")
    baseline_momentum: float = param(0.9, "moving-average baseline: b ← m·b + (1−m)·mean(G) after each round", ge=0.0, lt=1.0)


@dataclass(frozen=True)
class PPOParams:
    epochs: int = param(4, "passes over the round's data", ge=1)
    minibatch_size: int = param(64, "responses per optimizer step", ge=1)
    micro_batch_size: int = param(16, "responses per forward/backward pass (gradient accumulation); sets peak memory", ge=1)
    lr: float = param(1e-4, "peak AdamW learning rate", gt=0.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = param("linear", "learning-rate schedule over the round's optimizer steps")
    warmup_steps: int = param(0, "linear warm-up steps at the start of each round", ge=0)
    adam_eps: float = param(1e-5, "AdamW epsilon", gt=0.0)
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0.0)
    clip_range: float = param(0.2, "ε of the clipped surrogate: ratio kept in [1−ε, 1+ε]", gt=0.0)
    value_clip_range: float = param(0.2, "clip of the value prediction around the old values", gt=0.0)
    vf_coef: float = param(0.1, "weight of the value loss", ge=0.0)
    ent_coef: float = param(0.0, "weight of the entropy bonus", ge=0.0)
    max_grad_norm: Optional[float] = param(1.0, "gradient-norm clipping threshold; null: no clipping (the norm is still logged)", gt=0.0)
    target_kl: Optional[float] = param(0.1, "stop the round's updates early when approx-KL to π_old passes this; null disables", gt=0.0)
    dual_clip: Optional[float] = param(None, "dual-clip constant c > 1 bounding the loss of negative-advantage tokens at −c·A (Ye et al. 2020); null disables", gt=1.0)
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = param(
        "token_mean", "how token losses become a scalar: mean over all tokens, mean over sequences of per-sequence token means, or of token sums")
    kl_loss_coef: float = param(0.0, "weight of KL(π_θ‖π_ref) as a loss term (an alternative to advantages.kl_coef in the reward); grpo has its own, grpo.kl_coef, and refuses this one", ge=0.0)
    kl_loss_estimator: Literal["k1", "k2", "k3"] = param("k3", "estimator of the KL loss term (grpo: always k3)")
    ratio_level: Literal["token", "sequence"] = param("token", "importance ratio per token, or one per sequence: exp(mean_t log ρ_t) (GSPO-style)")


@dataclass(frozen=True)
class TRPOParams:
    max_kl: float = param(0.01, "trust region δ: mean KL(π_old‖π_θ) per token allowed for a step (trpo and npg)", gt=0.0)
    cg_iters: int = param(10, "conjugate-gradient iterations", ge=1)
    cg_damping: float = param(0.1, "damping λ added to the Fisher: (F + λI)·v", ge=0.0)
    cg_residual_tol: float = param(1e-10, "stop conjugate gradient when the squared residual falls below this", gt=0.0)
    backtrack_fraction: float = param(0.5, "line search: the step is multiplied by this after each rejection (trpo)", gt=0.0, lt=1.0)
    max_backtracks: int = param(10, "line search: rejections before giving up; then no update is made (trpo)", ge=0)
    steps: int = param(1, "trust-region steps per round, each on the full round's data", ge=1)
    trainable_last_n_blocks: Optional[int] = param(None, "restrict the policy update to the last N transformer blocks plus the final norm and LM head; null trains all", ge=0)
    critic_lr: float = param(1e-3, "learning rate of the critic's own Adam optimizer", gt=0.0)
    critic_epochs: int = param(4, "passes of value regression over the round's data", ge=0)


@dataclass(frozen=True)
class GRPOParams:
    scale_by_std: bool = param(True, "divide group-centred rewards by the group's std (false = Dr. GRPO)")
    eps: float = param(1e-6, "ε in (r − mean) / (std + ε)", gt=0.0)
    kl_coef: float = param(0.04, "β of the k3 KL(π_θ‖π_ref) loss term; GRPO puts no KL in the reward", ge=0.0)


@dataclass(frozen=True)
class RLOOParams:
    objective: Literal["reinforce", "clipped"] = param("reinforce", "loss on the leave-one-out advantages: the plain policy gradient, or PPO's clipped surrogate (ppo.*)")


@dataclass(frozen=True)
class EvaluateParams:
    num_prompts: int = param(64, "held-out eval prompts used (all if fewer)", ge=1)
    samples_per_prompt: int = param(2, "responses per eval prompt", ge=1)
    seed: int = param(1234, "sampling seed, the same for every checkpoint", ge=0)
    temperature: float = param(1.0, "sampling temperature of the evaluation", gt=0.0)
    max_new_tokens: int = param(24, "longest eval response in tokens", ge=1)
    num_perplexity_texts: int = param(200, "held-out demonstrations used for perplexity", ge=1)
    num_logged_samples: int = param(4, "sample responses written per checkpoint", ge=0)
    batch_size: int = param(128, "sequences per generation batch", ge=1)


@dataclass(frozen=True)
class TrackingParams:
    experiment: str = param("rlhf", "MLflow experiment name")
    tracking_uri: str = param("", "MLflow tracking URI; empty means sqlite:///<repo root>/mlflow.db. MLFLOW_TRACKING_URI overrides it")


_ROUND_KEY = r"^[A-Za-z][A-Za-z0-9_-]*$"


@dataclass(frozen=True)
class RewardModelParams:
    base: str = param("builtin", "`builtin`: a tiny classifier and its own tokenizer trained from scratch (shape: sft.tiny, vocabulary reward_vocab_size); `sft`: starts from models/sft; otherwise any hub id or local directory of a transformers model")
    reward_vocab_size: int = param(512, "builtin: vocabulary size of the reward model's own byte-level BPE tokenizer", ge=300)
    preferences: Literal["builtin", "file", "hf"] = param(
        "builtin", "where (prompt, chosen, rejected) pairs come from: the task's generator, a local jsonl/parquet/csv file, or a `datasets` dataset")
    path: str = param("", "file path or dataset name of the preference pairs (preferences: file or hf)")
    dataset_config: str = param("", "`datasets` configuration name; empty for none")
    split: str = param("train", "`datasets` split to read")
    prompt_field: str = param("prompt", "column with the prompt; empty when chosen/rejected hold the whole text")
    chosen_field: str = param("chosen", "column with the preferred response")
    rejected_field: str = param("rejected", "column with the dispreferred response")
    num_builtin_pairs: int = param(4000, "how many pairs the built-in generator writes", ge=10)
    heldout_fraction: float = param(0.1, "fraction of pairs held out for the pair-accuracy metric", gt=0.0, lt=1.0)
    epochs: int = param(1, "passes over the training pairs", ge=1)
    lr: float = param(1e-3, "peak AdamW learning rate", gt=0.0)
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0.0)
    warmup_ratio: float = param(0.05, "fraction of steps spent warming the learning rate up", ge=0.0, lt=1.0)
    batch_size: int = param(32, "pairs per optimizer step", ge=1)
    max_length: int = param(64, "prompt + response truncated to this many tokens (the end is kept)", ge=4)


@dataclass(frozen=True)
class RoundParams:
    # `from` is a Python keyword, so the YAML key `from` maps to `start_from`.
    start_from: str = param("sft", "checkpoint this round starts from: `sft` or an earlier round's key", pattern=_ROUND_KEY)


@dataclass(frozen=True)
class Params:
    seed: int = param(0, "global seed; every stage derives its own from it", ge=0)
    task: Literal["sentiment", "arithmetic"] = param(
        "sentiment", "built-in task: its prompt generator, demonstrations, preference pairs and `kind: task` reward (sentiment: review openings, VADER; arithmetic: two-digit sums `2 3 + 1 4 =`, exact match)")
    device: str = param("auto", "`auto` (CUDA when available), `cpu`, `cuda`, `cuda:N` or `mps`", pattern=_DEVICE)
    cpu_isa: Literal["avx2", "native"] = param("avx2", "CPU kernels every stage uses on x86: avx2 pins torch's and oneDNN's vector code to AVX2 (set by the launcher: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR), so an AVX-512 machine computes the same floats as an AVX2 one; native lets each library pick the widest the CPU has (faster on large models, but the bits then depend on the processor)")
    cpu_threads: int = param(2, "torch intra-op threads when running on CPU; a fixed count keeps CPU runs bit-for-bit reproducible under any machine load (the same count splits every float reduction the same way), 0 uses torch's default (one per physical core, so the bits depend on the machine)", ge=0)
    trust_remote_code: bool = param(False, "let transformers run Python code shipped with a hub model or tokenizer; off unless you trust its author")
    compute: ComputeParams = section(ComputeParams, "how stages run: processes, mixed precision and the distributed strategy (rollout and optimize), and warm start (every stage)")
    prepare: PrepareParams = section(PrepareParams, "prompt preparation")
    chat: ChatParams = section(ChatParams, "how prompts are shown to the policy (sft, rollout, evaluate): chat template and system prompt")
    sft: SFTParams = section(SFTParams, "the reference snapshot")
    rollout: RolloutParams = section(RolloutParams, "generation of each round")
    score: ScoreParams = section(ScoreParams, "reward scoring")
    advantages: AdvantagesParams = section(AdvantagesParams, "KL-penalised rewards and GAE")
    algorithm: AlgorithmParams = section(AlgorithmParams, "which policy optimizer, and the critic")
    lora: LoraParams = section(LoraParams, "low-rank adapters (peft) instead of full fine-tuning of the policy")
    reinforce: ReinforceParams = section(ReinforceParams, "REINFORCE returns and baselines (reinforce)")
    ppo: PPOParams = section(PPOParams, "clipped policy optimisation; epochs, batching and optimizer settings are shared by reinforce, a2c, grpo and rloo")
    trpo: TRPOParams = section(TRPOParams, "trust-region methods (trpo, npg)")
    grpo: GRPOParams = section(GRPOParams, "group-relative advantages (grpo)")
    rloo: RLOOParams = section(RLOOParams, "REINFORCE leave-one-out (rloo)")
    evaluate: EvaluateParams = section(EvaluateParams, "held-out evaluation")
    tracking: TrackingParams = section(TrackingParams, "MLflow")
    reward_models: dict = field(
        default_factory=dict,
        metadata={"doc": "reward models to train (stage train_reward@<name> → reward_models/<name>, usable as an hf_classifier model); empty: none"})
    rounds: dict = field(
        default_factory=lambda: {"r1": RoundParams("sft")},
        metadata={"doc": "ordered mapping of round key → {from: checkpoint}; adding a line adds a round"})

    def validate(self) -> "Params":
        """Cross-field checks that one field alone cannot express."""
        tiny = self.sft.tiny
        if tiny.hidden_size % tiny.num_heads:
            raise ConfigError(f"sft.tiny.num_heads = {tiny.num_heads}: must divide sft.tiny.hidden_size ({tiny.hidden_size})")
        if self.ppo.minibatch_size % self.ppo.micro_batch_size:
            raise ConfigError(f"ppo.micro_batch_size = {self.ppo.micro_batch_size}: must divide ppo.minibatch_size ({self.ppo.minibatch_size})")
        group_based = self.algorithm.name in ("grpo", "rloo") or (
            self.algorithm.name == "reinforce" and self.reinforce.baseline == "leave_one_out")
        if group_based and self.rollout.samples_per_prompt < 2:
            raise ConfigError(f"rollout.samples_per_prompt = {self.rollout.samples_per_prompt}: {self.algorithm.name} compares "
                              "the samples of a prompt and needs at least 2")
        if self.algorithm.name == "grpo" and self.ppo.kl_loss_coef != 0.0:
            raise ConfigError(f"ppo.kl_loss_coef = {self.ppo.kl_loss_coef}: grpo's KL loss weight is grpo.kl_coef "
                              f"({self.grpo.kl_coef}), which would silently replace it; set grpo.kl_coef and leave "
                              "ppo.kl_loss_coef at 0")
        if self.algorithm.name == "grpo" and self.ppo.kl_loss_estimator != "k3":
            raise ConfigError(f"ppo.kl_loss_estimator = {self.ppo.kl_loss_estimator!r}: grpo's KL loss always uses k3, "
                              "which would silently replace it; leave ppo.kl_loss_estimator at 'k3' with grpo")
        if self.prepare.source != "builtin" and not self.prepare.path:
            raise ConfigError(f"prepare.path is empty: required when prepare.source is {self.prepare.source!r}")
        if self.sft.demonstrations != "builtin" and not self.sft.demo_path:
            raise ConfigError(f"sft.demo_path is empty: required when sft.demonstrations is {self.sft.demonstrations!r}")
        if self.sft.model == "builtin" and self.sft.epochs == 0:
            raise ConfigError("sft.epochs = 0: a builtin model trained from scratch needs sft.epochs >= 1")
        names = [scorer.name for scorer in self.score.scorers]
        if not names:
            raise ConfigError("score.scorers is empty: at least one scorer is required, e.g. [{name: sentiment, kind: vader}]")
        if len(set(names)) != len(names):
            raise ConfigError(f"score.scorers: names must be unique, got {names}")
        for index, scorer in enumerate(self.score.scorers):
            where = f"score.scorers[{index}] ({scorer.name})"
            if scorer.kind == "python" and not re.match(r"^[\w.]+:[\w]+$", scorer.function):
                raise ConfigError(f"{where}.function = {scorer.function!r}: must be `module:function`")
            if (scorer.kind == "verifiable" or (scorer.kind == "task" and self.task == "arithmetic")) and not self.has_answers:
                what = "a verifiable scorer" if scorer.kind == "verifiable" else f"the {self.task} task's scorer"
                raise ConfigError(f"{where}: {what} needs reference answers: "
                                  "prepare.answer_field (the reference-answer column), or the builtin arithmetic prompts")
            if scorer.kind == "hf_classifier" and not scorer.model:
                raise ConfigError(f"{where}.model is empty: an hf_classifier needs a hub id or local directory, e.g. reward_models/bt")
        compute = self.compute
        if compute.mixed_precision == "fp16" and self.device == "cpu":
            raise ConfigError("compute.mixed_precision = 'fp16': not supported on CPU (device: cpu); must be 'no' or 'bf16' on CPU")
        if compute.strategy == "deepspeed":
            raise ConfigError("compute.strategy = 'deepspeed': not available yet (its accelerate integration never "
                              "trained a step); use 'fsdp' (FSDP2, parameters sharded) or 'ddp'")
        if compute.strategy == "fsdp" and compute.mixed_precision == "fp16":
            raise ConfigError("compute.mixed_precision = 'fp16': not supported with compute.strategy = 'fsdp' "
                              "(no sharded loss scaler); use 'bf16' or 'no'")
        if self.rollout.engine == "vllm" and compute.rollout_process_count != 1:
            raise ConfigError(f"rollout.engine = 'vllm': needs one rollout process, got {compute.rollout_process_count} "
                              "(vLLM runs the whole round in one process); set compute.rollout_processes: 1 (optimize "
                              "keeps compute.num_processes) or use engine: hf")
        if self.rollout.engine == "vllm" and self.device in ("cpu", "mps"):
            raise ConfigError(f"rollout.engine = 'vllm': needs a CUDA GPU, not device: {self.device}; "
                              "set device: auto, cuda or cuda:N, or use engine: hf")
        if self.lora.enabled and self.algorithm.critic == "separate":
            raise ConfigError("lora.enabled: the LoRA policy needs algorithm.critic = 'value_head' (a separate critic "
                              "backbone would be a second full model)")
        if self.lora.enabled and self.trpo.trainable_last_n_blocks is not None:
            raise ConfigError("trpo.trainable_last_n_blocks: must be null with lora.enabled (LoRA already chooses "
                              "what trains: lora.target_modules)")
        if compute.num_processes > 1 and self.algorithm.name in ("trpo", "npg"):
            raise ConfigError(f"compute.num_processes = {compute.num_processes}: {self.algorithm.name} runs in one process; "
                              "set compute.num_processes: 1 or choose ppo, grpo, rloo, reinforce or a2c")
        if compute.num_machines > 1 and self.algorithm.name in ("trpo", "npg"):
            raise ConfigError(f"compute.num_machines = {compute.num_machines}: {self.algorithm.name} runs in one process; "
                              "set compute.num_machines: 1 or choose ppo, grpo, rloo, reinforce or a2c")
        if compute.num_machines > 1 and self.rollout.engine == "vllm":
            raise ConfigError(f"rollout.engine = 'vllm': needs compute.num_machines = 1, got {compute.num_machines}")
        if not self.rounds:
            raise ConfigError("rounds is empty: at least one round is required, e.g. rounds: {r1: {from: sft}}")
        seen = {"sft"}
        for key, spec in self.rounds.items():
            if key == "sft":
                raise ConfigError("rounds.sft: `sft` names the reference snapshot and cannot be a round key")
            if spec.start_from not in seen:
                raise ConfigError(f"rounds.{key}.from = {spec.start_from!r}: must be `sft` or a round listed before it ({sorted(seen)})")
            seen.add(key)
        return self

    # -- derived values ---------------------------------------------------------------------------
    @property
    def has_answers(self) -> bool:
        """Whether the prompt sets carry a reference-answer column."""
        if self.prepare.source == "builtin":
            return self.task == "arithmetic"
        return bool(self.prepare.answer_field)

    def round_index(self, round_key: str) -> int:
        """1-based depth of a round in its `from` chain (sft is 0): the MLflow step of the round."""
        if round_key == "sft":
            return 0
        if round_key not in self.rounds:
            raise ConfigError(f"--round {round_key!r}: not in params rounds ({', '.join(self.rounds)})")
        return 1 + self.round_index(self.rounds[round_key].start_from)

    def round_seed(self, round_key: str, stage: str) -> int:
        """A seed for one stage of one round, derived from the global seed."""
        digest = hashlib.sha256(f"{self.seed}/{round_key}/{stage}".encode()).hexdigest()
        return int(digest[:8], 16)

    def to_dict(self) -> dict:
        return _to_plain(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Parsing and validation


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            key = "from" if f.name == "start_from" else f.name
            out[key] = _to_plain(getattr(value, f.name))
        return out
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            tuple: "a string or a list of strings"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, key: str, meta: dict):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, meta)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} = {value!r}: must be {_describe(tp)}")
        return value
    if tp is tuple:  # a string, or a list of strings
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
            raise ConfigError(f"{key} = {value!r}: must be a non-empty string or a list of them")
        return tuple(items)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: must be an integer")
    elif tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads `1e-5` as a string; accept it as the number it obviously is.
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} = {value!r}: must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r}: must be a finite number")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: must be a string")
        if meta.get("pattern") and not re.match(meta["pattern"], value):
            raise ConfigError(f"{key} = {value!r}: must match {meta['pattern']}")
        return value
    else:  # pragma: no cover - schema error, not a user error
        raise TypeError(f"unsupported field type {tp} for {key}")
    for bound, ok, words in (
        ("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"),
    ):
        limit = meta.get(bound)
        if limit is not None and not ok(value, limit):
            raise ConfigError(f"{key} = {value!r}: must be {words} {limit}")
    return value


def _build(cls, raw, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params.yaml'}: must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    by_yaml_key = {("from" if f.name == "start_from" else f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(by_yaml_key))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(by_yaml_key))}")
    kwargs = {}
    for yaml_key, f in by_yaml_key.items():
        key = f"{prefix}.{yaml_key}" if prefix else yaml_key
        if yaml_key not in raw:
            continue
        value, tp = raw[yaml_key], hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, key)
        elif f.name == "rounds":
            kwargs[f.name] = _build_rounds(value, key)
        elif f.name == "scorers":
            kwargs[f.name] = _build_scorers(value, key)
        elif f.name == "reward_models":
            kwargs[f.name] = _build_reward_models(value, key)
        else:
            kwargs[f.name] = _coerce(value, tp, key, dict(f.metadata))
    return cls(**kwargs)


def _build_scorers(raw, key: str) -> tuple:
    if not isinstance(raw, list):
        raise ConfigError(f"{key}: must be a list like [{{name: sentiment, kind: vader, weight: 1.0}}]")
    return tuple(_build(ScorerParams, spec, f"{key}[{index}]") for index, spec in enumerate(raw))


def _build_reward_models(raw, key: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: must be a mapping like {{bt: {{base: builtin}}}}, or {{}} for none")
    models = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not re.match(_IDENTIFIER, name):
            raise ConfigError(f"{key}.{name}: a reward model name must be an identifier like bt (letters, digits, _)")
        models[name] = _build(RewardModelParams, spec, f"{key}.{name}")
    return models


def _build_rounds(raw, key: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: must be a mapping like {{r1: {{from: sft}}, r2: {{from: r1}}}}")
    rounds = {}
    for round_key, spec in raw.items():
        if not isinstance(round_key, str) or not re.match(_ROUND_KEY, round_key):
            raise ConfigError(f"{key}.{round_key}: a round key must be a name like r1 (letters, digits, _ or -)")
        rounds[round_key] = _build(RoundParams, spec, f"{key}.{round_key}")
    return rounds


def params_from_dict(raw: dict) -> Params:
    return _build(Params, raw, "").validate()


def yaml_load(text: str):
    """Parse YAML as DVC does (YAML 1.2 core schema): only true/false are booleans, so `no`, `on` or
    `yes` stay strings, and `1e-5` is a number.  PyYAML's safe_load follows YAML 1.1, which reads an
    unquoted `no` as false; `dvc exp run -S` rewrites params.yaml with a YAML 1.2 dumper that drops
    the quotes of 'no', so safe_load would read back a different value than DVC wrote."""
    import yaml

    return yaml.load(text, Loader=_yaml12_loader())


@functools.cache
def _yaml12_loader():
    import yaml

    class Yaml12Loader(yaml.SafeLoader):
        pass

    Yaml12Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Yaml12Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                       list("tTfF"))
    Yaml12Loader.add_implicit_resolver(
        _FLOAT_TAG, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return Yaml12Loader


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ConfigError with one readable line on any problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return params_from_dict(raw or {})


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'ppo': {'lr': 1}} -> {'ppo.lr': 1}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _yaml_scalar(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("...").strip()


def schema_rows(cls=Params, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every leaf field, depth first: the params reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{'from' if f.name == 'start_from' else f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += schema_rows(tp, key + ".")
        elif f.name == "rounds":
            rows.append((key, "mapping", {"r1": {"from": "sft"}}, f.metadata["doc"]))
        elif f.name == "scorers":
            rows.append((key, "list", [{"name": "task", "kind": "task"}], f.metadata["doc"]))
            rows += schema_rows(ScorerParams, key + "[].")
        elif f.name == "reward_models":
            rows.append((key, "mapping", {}, f.metadata["doc"]))
            rows += schema_rows(RewardModelParams, key + ".<name>.")
        else:
            rows.append((key, _describe(tp), getattr(defaults, f.name), f.metadata["doc"]))
    return rows


def _scorer_fields(scorer: "ScorerParams") -> dict:
    """The scorer's keys that matter for its kind (defaults of other kinds are left out)."""
    kind_keys = {"length": ("target_length",), "verifiable": ("match", "tolerance"), "python": ("function",),
                 "hf_classifier": ("model", "ensemble", "label", "output", "text", "batch_size", "max_length", "device",
                                   "allow_untrained_head")}
    keys = ("name", "kind", "weight", "normalize", "clip", *kind_keys.get(scorer.kind, ()))
    return {key: list(value) if isinstance(value := getattr(scorer, key), tuple) else value for key in keys}


def render_params_yaml(params: Params | None = None) -> str:
    """params.yaml text for ``params`` (defaults if None), every key documented in a comment."""
    params = params or Params()
    lines: list[str] = []

    def emit(obj, indent: int):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            pad = "  " * indent
            value, tp = getattr(obj, f.name), hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"{pad}{f.name}:  # {f.metadata['doc']}")
                emit(value, indent + 1)
            elif f.name == "reward_models":
                if not value:
                    lines.append(f"{pad}reward_models: {{}}  # {f.metadata['doc']}")
                else:
                    lines.append(f"{pad}reward_models:  # {f.metadata['doc']}")
                    for key, spec in value.items():
                        changed = {k: v for k, v in _to_plain(spec).items() if v != getattr(RewardModelParams(), k)}
                        lines.append(f"{pad}  {key}: {_yaml_scalar(changed)}")
            elif f.name == "rounds":
                lines.append(f"{pad}# {f.metadata['doc']}")
                lines.append(f"{pad}rounds:")
                for key, spec in value.items():
                    lines.append(f"{pad}  {key}: {{from: {spec.start_from}}}")
            elif f.name == "scorers":
                lines.append(f"{pad}{f.name}:  # {f.metadata['doc']} (every scorer key: docs/params.md)")
                for scorer in value:
                    lines.append(f"{pad}  - {_yaml_scalar(_scorer_fields(scorer))}")
            else:
                lines.append(f"{pad}{f.name}: {_yaml_scalar(value)}  # {f.metadata['doc']}")
        if indent == 0:
            lines.append("")

    emit(params, 0)
    return "\n".join(lines)
