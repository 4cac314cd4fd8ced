"""Rollout generation: sample responses with the round's policy and record, per response token, the
sampling policy's log-probs, the reference's log-probs and the critic's values.

Generation is HF ``generate``: batched, KV-cached, left-padded (position ids from the attention mask),
stopping when every sequence has emitted EOS.  Prompts are bucketed by token length so batches carry
little padding.  Log-probs are then recomputed by ``rlhf_core.model.forward`` with the same collation and
temperature scaling that training uses, so the first PPO ratio on an unchanged policy is exactly 1.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from rlhf_core.errors import DataError
from rlhf_core.model.batches import collate, left_padded, length_buckets
from rlhf_core.model.forward import policy_logprobs
from rlhf_core.runtime.progress import Progress


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]  # up to and including the first EOS
    ended_with_eos: bool
    sampler_logprobs: list[float] | None = None  # log μ(a_t) of each response token under the distribution it was
    # drawn from (after temperature, top-k, top-p), when recorded (rollout.record_sampler_logprobs)


class SampledTokenLogprobs:
    """A logits processor, placed last, that records log μ(a_t) of each sampled token: it keeps the final step
    distribution log_softmax(scores) [B, V] and, at the next step (or in ``finish``), gathers the log-prob of the
    token that step drew (the last column of ``input_ids``).  One [B, V] tensor alive at a time, not one per step."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []  # [B] per generated position

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._gather(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _gather(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, tokens.unsqueeze(1)).squeeze(1))
            self.previous = None

    def finish(self, output_ids: torch.Tensor) -> torch.Tensor:
        """[B, generated] log-probs, given generate's output (whose last column the last step drew)."""
        self._gather(output_ids[:, -1])
        return torch.stack(self.steps, dim=1).cpu()


def sampling_processors(temperature: float, top_p: float, top_k: int):
    """HF's own sampling warpers, in the order ``generate`` applies them (temperature, top-k, top-p), then the
    recorder: with these passed explicitly and the config's temperature 1, top_k 0 and top_p 1, generate draws
    from exactly the distribution it would have drawn from, and the recorder sees it.  Returns (list, recorder)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    recorder = SampledTokenLogprobs()
    warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + (
        [TopKLogitsWarper(top_k=top_k)] if top_k != 0 else []) + ([TopPLogitsWarper(top_p=top_p)] if top_p < 1.0 else [])
    return LogitsProcessorList([*warpers, recorder]), recorder


def generation_config(tokenizer, *, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                      stop_ids: list[int] | None = None):
    """A complete GenerationConfig, so no default of the checkpoint (top_k=50, repetition penalty, …)
    silently changes the sampling distribution away from softmax(logits / T).  Generation stops at any of
    ``stop_ids`` (default: the tokenizer's EOS)."""
    from transformers import GenerationConfig

    stop_ids = list(stop_ids or [tokenizer.eos_token_id])
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                            max_new_tokens=max_new_tokens, eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
                            pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0, num_beams=1)


@contextlib.contextmanager
def only_this_config(policy, config):
    """``generate`` fills every setting of the given config that equals the library default (min_p, typical_p,
    repetition_penalty, epsilon/eta cutoffs, …) from the checkpoint's own generation_config, so a checkpoint that
    ships min_p 0.05 would silently truncate the sampling distribution.  While this is open the policy's
    generation_config is ``config`` itself: nothing else can fill in."""
    saved = policy.generation_config
    policy.generation_config = config
    try:
        yield
    finally:
        policy.generation_config = saved


def truncate_at_eos(tokens: list[int], stop_ids) -> tuple[list[int], bool]:
    """Cut a generated sequence after its first end id (an int, or any of a collection; the id is kept);
    report whether there was one."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[: position + 1], True
    return tokens, False


def check_context(prompt_ids: list[list[int]], max_new_tokens: int, context: int | None, where: str) -> None:
    """Every prompt plus max_new_tokens must fit the model's context window."""
    if context is None:
        return
    for row, ids in enumerate(prompt_ids):
        if len(ids) + max_new_tokens > context:
            raise DataError(f"{where}: prompt row {row} has {len(ids)} tokens; with max_new_tokens {max_new_tokens} it "
                            f"exceeds the model's context of {context} tokens; lower prepare.max_prompt_chars "
                            "or the max_new_tokens")


def context_length(config) -> int | None:
    """The model's context window from its config (None if it does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def check_finite(stats: dict[str, list], where: str) -> None:
    """Refuse NaN/inf log-probs or values before they reach the advantages."""
    for name, arrays in stats.items():
        for row, array in enumerate(arrays):
            if not np.isfinite(array).all():
                raise FloatingPointError(f"{where}: {name} of response {row} are not finite; the checkpoint may be "
                                         "corrupted by a diverged update (lower optim.lr)")


@torch.inference_mode()
def generate_samples(policy, tokenizer, prompt_ids: list[list[int]], *, samples_per_prompt: int, temperature: float,
                     top_p: float, top_k: int, max_new_tokens: int, batch_size: int, seed: int,
                     device: torch.device, runtime=None, stop_ids: list[int] | None = None,
                     record_sampler_logprobs: bool = False) -> list[Sample]:
    """``samples_per_prompt`` sampled responses for each prompt, in (prompt, sample) order; a response ends at
    the first of ``stop_ids`` (``chat.stop_token_ids``; default: the tokenizer's EOS).

    ``record_sampler_logprobs``: each Sample also carries the log-probs generate drew its tokens from
    (``sampling_processors``); the samples themselves are the same as without.

    Each batch is seeded with ``seed + batch number``, so the result does not depend on what ran before.
    With several processes (``runtime``), the batch plan is the same on every rank and whole batches go
    to ranks round-robin, each seeded as in one process; every rank gets all the samples back, so the
    result does not depend on the process count.
    """
    from rlhf_core.runtime.distributed import Runtime

    runtime = runtime or Runtime(device=device)  # plain: one process, no autocast
    stop_ids = list(stop_ids or [tokenizer.eos_token_id])
    if record_sampler_logprobs:  # the same warpers, passed explicitly so that the recorder runs after them
        config = generation_config(tokenizer, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                                   stop_ids=stop_ids)
    else:
        config = generation_config(tokenizer, temperature=temperature, top_p=top_p, top_k=top_k,
                                   max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    jobs = [(p, s) for p in range(len(prompt_ids)) for s in range(samples_per_prompt)]
    results: dict[tuple[int, int], Sample] = {}
    plan = runtime.shard(list(enumerate(length_buckets([len(prompt_ids[p]) for p, _ in jobs], batch_size))))
    progress = Progress(sum(len(members) for _, members in plan), "generate", unit="sequence")
    for batch_number, members in plan:
        batch_jobs = [jobs[i] for i in members]
        input_ids, attention_mask = left_padded([prompt_ids[p] for p, _ in batch_jobs], tokenizer.pad_token_id)
        width = input_ids.shape[1]
        torch.manual_seed(seed + batch_number)
        processors, recorder = sampling_processors(temperature, top_p, top_k) if record_sampler_logprobs else (None, None)
        try:
            with runtime.autocast(), only_this_config(policy, config):
                output = policy.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                         generation_config=config,
                                         **({"logits_processor": processors} if processors is not None else {}))
        except RuntimeError as exc:  # torch.multinomial on NaN/inf probabilities
            if "inf" in str(exc) or "nan" in str(exc):
                raise FloatingPointError("the policy gave NaN/inf probabilities while generating; its weights are "
                                         "corrupt (a diverged update? lower optim.lr)") from None
            raise
        sampled = recorder.finish(output[:, width:]) if recorder is not None else None
        for row, (p, s) in enumerate(batch_jobs):
            response, ended = truncate_at_eos(output[row, width:].tolist(), stop_ids)
            results[(p, s)] = Sample(p, s, prompt_ids[p], response, ended,
                                     None if sampled is None else sampled[row, :len(response)].tolist())
        progress.update(len(batch_jobs))
    progress.close()
    for shard in runtime.all_gather(results) if runtime.distributed else ():
        results.update(shard)
    return [results[job] for job in jobs]


@torch.inference_mode()
def record_token_stats(actor_critic, reference, samples: list[Sample], *, pad_id: int, temperature: float,
                       batch_size: int, device: torch.device, reference_is_policy: bool = False,
                       with_reference: bool = True, runtime=None) -> dict[str, list]:
    """Per-sample float32 arrays: ``logprobs``, ``ref_logprobs`` and ``values``, each [len(response)].

    ``reference_is_policy`` (round 1 starts at π_ref) reuses the policy's log-probs for the reference:
    the same weights through the same code give the same numbers, at half the cost.  ``reference`` None
    with a LoRA policy: the reference is the same model with its adapters disabled.  ``with_reference``
    False (the KL-free mode, ``Params.uses_reference``): no reference forward, and no ``ref_logprobs`` key.
    With several processes, the forward batches go to ranks round-robin as in ``generate_samples``,
    and every rank gets all the arrays back.
    """
    from rlhf_core.runtime.distributed import Runtime

    runtime = runtime or Runtime(device=device)  # plain: one process, no autocast
    names = ("logprobs", "ref_logprobs", "values") if with_reference else ("logprobs", "values")
    stats = {name: [None] * len(samples) for name in names}
    plan = length_buckets([len(s.prompt_ids) + len(s.response_ids) for s in samples], batch_size)
    for members in runtime.shard(plan):
        batch = collate([samples[i].prompt_ids for i in members], [samples[i].response_ids for i in members],
                        pad_id).to(device)
        with runtime.autocast():
            out = actor_critic(batch, temperature, with_values=True)
            arrays = {"logprobs": out.logprobs, "values": out.values}
            if with_reference:
                arrays["ref_logprobs"] = out.logprobs if reference_is_policy else reference_logprobs(
                    actor_critic, reference, batch, temperature)
        for row, index in enumerate(members):
            length = len(samples[index].response_ids)
            for name, tensor in arrays.items():
                stats[name][index] = tensor[row, :length].float().cpu().numpy().astype(np.float32)
    if runtime.distributed:
        for shard in runtime.all_gather(stats):
            for name, arrays in shard.items():
                for index, array in enumerate(arrays):
                    if array is not None:
                        stats[name][index] = array
    return stats


def reference_logprobs(actor_critic, reference, batch, temperature: float):
    """π_ref's log-probs: a separate reference model, or (``reference`` None) the policy's base model with
    its LoRA adapters disabled, so the reference costs no second copy of the weights."""
    if reference is not None:
        return policy_logprobs(reference, batch, temperature)
    with actor_critic.policy.disable_adapter():
        return policy_logprobs(actor_critic.policy, batch, temperature)


def rollout_table(prompts: list[str], samples: list[Sample], stats: dict[str, list], tokenizer):
    """One row per response: text, token ids and per-token arrays (Parquet list columns; no ``ref_logprobs``
    in the KL-free mode)."""
    import pandas as pd

    rows = []
    for index, sample in enumerate(samples):
        rows.append({
            "prompt_index": sample.prompt_index,
            "sample_index": sample.sample_index,
            "prompt": prompts[sample.prompt_index],
            "response": tokenizer.decode(sample.response_ids, skip_special_tokens=True),
            "prompt_ids": np.asarray(sample.prompt_ids, dtype=np.int32),
            "response_ids": np.asarray(sample.response_ids, dtype=np.int32),
            "ended_with_eos": sample.ended_with_eos,
            "response_length": len(sample.response_ids),
            **{name: stats[name][index] for name in ("logprobs", "ref_logprobs", "values") if name in stats},
            **({} if sample.sampler_logprobs is None else
               {"sampler_logprobs": np.asarray(sample.sampler_logprobs, dtype=np.float32)}),
        })
    return pd.DataFrame(rows)


def sample_prompt_indices(num_prompts: int, count: int, seed: int) -> list[int]:
    """``count`` distinct prompt indices (with replacement only when count > num_prompts), seeded."""
    generator = np.random.default_rng(seed)
    if count <= num_prompts:
        return sorted(generator.choice(num_prompts, size=count, replace=False).tolist())
    return sorted(generator.choice(num_prompts, size=count, replace=True).tolist())
