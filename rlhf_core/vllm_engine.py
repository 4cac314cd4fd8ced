"""Rollout generation with vLLM (``rollout.engine: vllm``): GPU only, ``pip install vllm``.

Status: this module has NOT been run against a real vLLM engine in this repository (the machine it was
written on has no GPU and no vLLM).  ``tests/test_vllm_engine.py`` checks it against a fake ``vllm``
module shaped like vLLM's documented API (``LLM``, ``SamplingParams``, ``RequestOutput.outputs`` of
``CompletionOutput``), which proves the plumbing, not vLLM's behaviour.

Why vLLM loads the checkpoint from disk.  The pipeline is staged: each round's ``rollout`` is its own
process that reads ``models/<from>`` and writes a Parquet table; no trainer is alive at the same time.
So vLLM simply starts on the checkpoint directory, and there is no weight synchronisation between a
training and an inference engine to get wrong.  A LoRA checkpoint is first merged into a plain model in
a temporary directory (``rlhf_core.export.export_merged``), which vLLM then loads like any other.

Same distribution as the HF path.  ``SamplingParams`` get the round's temperature, top_p, top_k (0 is
passed as -1, "disabled", which every vLLM version accepts), max_new_tokens and EOS as the only extra
stop token, with no repetition/presence/frequency penalty and min_p 0, so responses are drawn from
softmax(logits / T) exactly as ``rlhf_core.rollout.generate_samples`` draws them.  Responses are cut
after their first end id (kept) like ``truncate_at_eos``.

vLLM's own log-probs do not replace the trainer's.  ``record_token_stats`` recomputes the policy's log-probs, the
reference's and the values with the training code's forward pass, so the first PPO ratio on an
unchanged policy is exactly 1, whatever vLLM's kernels or dtype.  If vLLM's numerics differ from the
training model's (bf16, other attention kernels), the samples are very slightly off-policy; the
recorded log-probs are still those of the policy being trained.  vLLM's log-probs of the distribution it sampled
(``logprobs_mode="processed_logprobs"``) are kept beside them as ``sampler_logprobs``, by default with this engine
(rollout.record_sampler_logprobs), and rollout_correction weighs the policy loss by their ratio (tis) or drops the
tokens where they disagree (mis).

Seeds.  One ``SamplingParams`` per prompt, seeded ``seed + prompt_index * samples_per_prompt``; vLLM
(V1) seeds the n samples of a request ``seed + sample_index``, so every (prompt, sample) has its own
seed.  That makes a rollout repeatable on the same GPU, driver and vLLM/torch versions only; it is not
bit-identical to the HF engine's samples, nor across hardware or software versions.

GPU memory.  vLLM reserves ``gpu_memory_utilization`` (rollout.gpu_memory_fraction) of the GPU.  The stage generates before it loads
the HF models for the log-probs, and this function shuts the engine down and empties the CUDA cache
before returning.  Freeing all of vLLM's memory inside a process has varied across vLLM versions;
if the HF models then run out of memory, lower rollout.gpu_memory_fraction.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from pathlib import Path

from rlhf_core.errors import ConfigError, DataError, first_line
from rlhf_core.rollout import Sample, check_context, context_length, truncate_at_eos

NOT_INSTALLED = "rollout.engine = 'vllm': vLLM is not installed (pip install vllm; GPU only); use engine: hf"


def generate_samples_vllm(model_dir: str | Path, prompt_ids: list[list[int]], *, samples_per_prompt: int,
                          temperature: float, top_p: float, top_k: int, max_new_tokens: int, seed: int, stop_ids: list[int],
                          dtype: str = "auto", gpu_memory_utilization: float = 0.6, enforce_eager: bool = True,
                          trust_remote_code: bool = False, record_sampler_logprobs: bool = False) -> list[Sample]:
    """``samples_per_prompt`` sampled responses for each prompt, in (prompt, sample) order, by vLLM.

    ``model_dir`` is a checkpoint directory (full model, or LoRA adapters, merged here first).  ``dtype``
    goes to ``vllm.LLM``: note that ``auto`` turns a float32 checkpoint into float16 in vLLM, so pass
    ``float32`` to sample from the same precision as a float32 HF policy.  ``enforce_eager`` skips CUDA
    graph capture, which costs more than it saves for one round of generation on a small model.
    ``record_sampler_logprobs``: each Sample carries vLLM's log-prob of each of its tokens, from the distribution
    it sampled (``logprobs_mode="processed_logprobs"``: after temperature, top-k and top-p), for
    rollout_correction.
    """
    try:
        import vllm
    except ImportError:
        raise ConfigError(NOT_INSTALLED) from None
    import torch

    _require_cuda()
    from rlhf_core.models import is_adapter_checkpoint

    with contextlib.ExitStack() as stack:
        model_dir = str(model_dir)
        if is_adapter_checkpoint(model_dir):  # vLLM loads one plain model: merge the adapters into a temporary copy
            from rlhf_core.export import export_merged

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rlhf-vllm-merged-"))
            model_dir = str(export_merged(model_dir, Path(tmp) / "model", trust_remote_code))
        from transformers import AutoConfig

        check_context(prompt_ids, max_new_tokens,
                      context_length(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)),
                      "train prompts")
        refusals = _refusal_errors(vllm)
        try:
            per_prompt = [vllm.SamplingParams(
                n=samples_per_prompt, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                max_tokens=max_new_tokens, seed=seed + p * samples_per_prompt, stop_token_ids=list(stop_ids),
                ignore_eos=False, detokenize=False, **({"logprobs": 0} if record_sampler_logprobs else {}))
                for p in range(len(prompt_ids))]
        except refusals as exc:  # e.g. newer vLLM refuses temperature > 2
            raise _refused(exc) from None
        try:
            llm = vllm.LLM(model=model_dir, tokenizer=model_dir, seed=seed, dtype=dtype,
                           gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                           trust_remote_code=trust_remote_code,
                           **({"logprobs_mode": "processed_logprobs"} if record_sampler_logprobs else {}))
        except TypeError as exc:  # a vLLM before logprobs_mode (0.10.1) cannot say what it sampled from
            if record_sampler_logprobs and "logprobs_mode" in str(exc):
                raise ConfigError("rollout.record_sampler_logprobs: this vLLM has no logprobs_mode (vLLM >= 0.10.1 "
                                  "reports the sampled distribution's log-probs); upgrade vLLM or set it to false") from None
            raise
        try:
            outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], per_prompt, use_tqdm=False)
        except refusals as exc:  # vLLM >= 0.33 validates requests in the engine and raises VLLMError subclasses
            raise _refused(exc) from None
        finally:
            _shutdown(llm)
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    if len(outputs) != len(prompt_ids):
        raise DataError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
    samples = []
    for p, output in enumerate(outputs):  # LLM.generate returns outputs in prompt order
        completions = sorted(output.outputs, key=lambda c: c.index)
        if len(completions) != samples_per_prompt:
            raise DataError(f"vLLM returned {len(completions)} responses for prompt row {p}, "
                            f"expected {samples_per_prompt}")
        for s, completion in enumerate(completions):
            response, ended = response_ids(completion, stop_ids)
            sampled = sampled_logprobs(completion, response) if record_sampler_logprobs else None
            samples.append(Sample(p, s, list(prompt_ids[p]), response, ended, sampled))
    return samples


def sampled_logprobs(completion, response: list[int]) -> list[float]:
    """vLLM's log-prob of each token of ``response`` (a CompletionOutput requested with ``logprobs=0``: per
    position, a mapping of token id → Logprob that holds the sampled token)."""
    positions = list(completion.logprobs or [])
    if len(positions) < len(response):
        raise DataError(f"vLLM returned log-probs for {len(positions)} of the {len(response)} tokens of a response "
                        "(a stop token it did not keep?); set rollout.record_sampler_logprobs: false")
    values = []
    for position, token in enumerate(response):
        entry = positions[position].get(token) if hasattr(positions[position], "get") else None
        if entry is None:
            raise DataError(f"vLLM's log-probs at position {position} lack the sampled token {token}")
        values.append(float(getattr(entry, "logprob", entry)))
    return values


def vllm_dtype(compute, checkpoint: str | Path) -> str:
    """The dtype vLLM samples in: the HF policy's (``compute.param_dtype``; ``auto``: the checkpoint's stored
    dtype, read here because vLLM's own ``auto`` turns float32 into float16), or with float32 weights the
    autocast dtype of ``compute.mixed_precision``."""
    from rlhf_core.models import adapter_base, is_adapter_checkpoint, stored_dtype

    weights = compute.param_dtype
    if weights == "auto":
        base = adapter_base(checkpoint) if is_adapter_checkpoint(checkpoint) else checkpoint
        weights = stored_dtype(base) or "float32"
    if weights != "float32":
        return weights
    return {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[compute.mixed_precision]


def _refusal_errors(vllm) -> tuple[type[BaseException], ...]:
    """What vLLM raises for values it refuses: ValueError, and from vLLM 0.33 ``vllm.exceptions.VLLMError``."""
    vllm_error = getattr(getattr(vllm, "exceptions", None), "VLLMError", None)
    return (ValueError,) + ((vllm_error,) if isinstance(vllm_error, type) else ())


def _refused(exc: BaseException) -> ConfigError:
    return ConfigError(f"rollout: vLLM refuses these sampling params ({first_line(exc)}); change them or use engine: hf")


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("rollout.engine = 'vllm': needs a CUDA GPU and none is visible; use engine: hf")


def response_ids(completion, stop_ids: list[int]) -> tuple[list[int], bool]:
    """A vLLM CompletionOutput's token ids cut after the first end id (kept), and whether it ended with one.

    ``stop_ids`` are every id that ends a response (``chat.stop_token_ids``: the tokenizer's EOS first).
    vLLM keeps the stop token in ``token_ids`` (only the text drops it), so it is normally found there.
    A completion that finished with ``finish_reason == "stop"`` on an end id (``stop_reason`` None: the
    tokenizer's EOS; or one of ``stop_ids``) but lacks it in ``token_ids`` gets it appended, so
    ``response_ids`` match the HF path, whose training log-probs include the end token.  A stop on any
    other token is refused: the HF path would not have stopped there.
    """
    tokens, ended = truncate_at_eos(list(completion.token_ids), stop_ids)
    if ended:
        return tokens, True
    if completion.finish_reason == "stop":
        reason = getattr(completion, "stop_reason", None)
        if reason is not None and reason not in stop_ids:
            raise DataError(f"vLLM stopped a response on {reason!r}, not on an end id of the model ({stop_ids}); "
                            "use engine: hf")
        return tokens + [stop_ids[0] if reason is None else reason], True
    return tokens, False  # finish_reason "length": hit max_new_tokens


def _shutdown(llm) -> None:
    """Best effort: stop vLLM's engine (its V1 engine-core process holds the GPU memory) and tear down the
    distributed state it set up, so the HF models loaded next in this process get the GPU back."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    for target in (core, engine, llm):
        shutdown = getattr(target, "shutdown", None)
        if callable(shutdown):
            with contextlib.suppress(Exception):
                shutdown()
            break
    with contextlib.suppress(Exception):
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
