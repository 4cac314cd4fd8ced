"""Supervised fine-tuning of the reference snapshot π_ref (the start of round 1).

``builtin``: a byte-level BPE tokenizer and a tiny causal LM are trained from scratch on the task's
demonstrations.  Otherwise an AutoModelForCausalLM is fine-tuned, or with ``epochs: 0`` snapshotted.
Loss: mean next-token cross-entropy over the trained tokens (the whole text + EOS, or only the
response + EOS when ``completion_only_loss``).
"""

from __future__ import annotations

import math
import time

import torch

from rlhf_core.errors import DataError
from rlhf_core.model.batches import collate
from rlhf_core.model.loading import (
    build_tiny_model,
    disable_dropout,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    match_vocab,
    train_tokenizer,
)
from rlhf_core.runtime.progress import Progress


def encode_demonstrations(tokenizer, rows: list[dict], max_length: int, *, chat) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids + [eos]) per row, truncated so that the total fits max_length.

    The prompt is encoded as rollout encodes it (``chat.encode_prompt``: the chat template when ``chat``
    uses one), so the model learns to answer what it will be asked; the response ends with EOS, which
    for an instruct tokenizer is its end-of-turn token."""
    from rlhf_core.model.chat import encode_prompts

    if any("messages" in row for row in rows):  # a tool task's episodes
        return [encode_episode(tokenizer, row["messages"], row.get("tools"), max_length) for row in rows]
    prompts = encode_prompts(tokenizer, [row["prompt"] for row in rows], chat=chat)
    encoded = []
    for row, prompt in zip(rows, prompts):
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt, response = fit_to_length(prompt, response, max_length)
        if prompt:
            encoded.append((prompt, response))
    return encoded


def encode_episode(tokenizer, messages_json: str, tools_json: str | None, max_length: int
                   ) -> tuple[list[int], list[int]]:
    """A demonstration episode (the conversation and its tools, as JSON) as (prompt_ids, response_ids), the ids a
    rollout would hold: the prompt is the conversation before the first assistant turn rendered with the
    generation prompt (``episodes.render``, as ``run_episodes`` renders it), the response the rest of the rendered
    conversation up to its last end of turn (the text after it is never sampled).  Cut to ``max_length`` tokens
    by ``fit_to_length``, as every demonstration."""
    import json

    from rlhf_core.phases.episodes import render

    messages, tools = json.loads(messages_json), json.loads(tools_json) if tools_json else None
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None or first == 0:
        raise DataError("a demonstration episode needs messages before its first assistant turn, and one")
    prompt_text = render(tokenizer, messages[:first], tools, generation_prompt=True)
    full_text = render(tokenizer, messages, tools, generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise DataError("the chat template renders a demonstration's opening differently once the answer follows")
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    ends = [i for i, token in enumerate(response) if token == tokenizer.eos_token_id]
    return fit_to_length(prompt, response[: ends[-1] + 1] if ends else response, max_length)


def fit_to_length(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """A demonstration cut to ``max_length`` tokens: the prompt keeps its last max_length // 2 tokens (at least
    one), the response its first tokens up to the rest (at least one)."""
    prompt = prompt[-max(1, max_length // 2):]
    return prompt, response[: max(1, max_length - len(prompt))]


def builtin_tokenizer_corpus(task: str, train_rows: list[dict], vocab_size: int) -> tuple:
    """``train_tokenizer``'s arguments for the from-scratch model: the demonstrations' text; for a tool task (whose
    demonstrations are episodes, ``messages``) every turn's role and content, and its chat template and tokens."""
    if not any("messages" in row for row in train_rows):
        return [row["prompt"] + row["response"] for row in train_rows], vocab_size
    import json

    from rlhf_core.phases.tasks import get_task

    task_module = get_task(task)
    texts = ["\n".join(f"{m['role']}\n{m['content']}" for m in json.loads(row["messages"])) for row in train_rows]
    return (texts, vocab_size, task_module.CHAT_TEMPLATE, task_module.CHAT_SPECIAL_TOKENS,
            task_module.END_OF_TURN, task_module.ADDED_TOKENS, task_module.SPLIT_DIGITS)


def build_reference(params, train_rows: list[dict], device: torch.device, log=print):
    """Return (model, tokenizer) for the SFT stage: from scratch, or loaded from ``params.sft.model``.

    A loaded model keeps its vocabulary: pad becomes a spare special token when it equals an end id
    (``models.load_tokenizer``), and the model's configs record every end id (``models.match_vocab``)."""
    from rlhf_core.model.chat import stop_token_ids

    sft = params.sft
    if sft.model == "builtin":
        tokenizer = train_tokenizer(*builtin_tokenizer_corpus(params.task, train_rows, sft.tiny.vocab_size))
        model = disable_dropout(build_tiny_model(sft.tiny, tokenizer)).to(device)
        if params.compute.param_dtype == "bfloat16":  # float32 otherwise: a new model has no stored dtype
            model = model.to(torch.bfloat16)
    else:
        model = load_causal_lm(sft.model, device, params.trust_remote_code, param_dtype=params.compute.param_dtype)
        generation = getattr(model, "generation_config", None)
        eos_values = (model.config.eos_token_id, getattr(generation, "eos_token_id", None))
        tokenizer = load_tokenizer(sft.model, params.trust_remote_code, eos_values=eos_values,
                                   vocab_rows=model.get_input_embeddings().weight.shape[0], log=log)
        match_vocab(model, tokenizer, stop_token_ids(tokenizer, *eos_values))
    if params.compute.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    from rlhf_core.phases.rollout import context_length

    context = context_length(model.config)
    if context is not None and sft.max_length > context:
        raise DataError(f"sft.max_length = {sft.max_length}: longer than the model's context of {context} tokens")
    return model, tokenizer


def trained_tokens(prompt: list[int], response: list[int], completion_only: bool) -> int:
    """How many tokens of one (prompt, response) the loss trains: every token after the first, or the response's."""
    return len(response) if completion_only else len(prompt) + len(response) - 1


def sequence_nll(model, batch, completion_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the trained tokens, and their count.

    With the left-padded layout the prompt tokens are trained too (unless ``completion_only``):
    position j predicts token j+1 wherever both are real tokens.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False)
    logits = out.logits[:, :-1, :].float()
    targets = batch.input_ids[:, 1:]
    mask = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).float()
    if completion_only:  # position j predicts token j+1: keep those whose target is a response token
        columns = torch.arange(1, batch.input_ids.shape[1], device=mask.device)
        mask = mask * (columns.unsqueeze(0) >= batch.response_start.unsqueeze(1)).float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll.view_as(mask) * mask).sum(), mask.sum()


def accumulate_gradients(model, rows: list[tuple[list[int], list[int]]], micro_batch_size: int, pad_id: int,
                         completion_only: bool, device: torch.device) -> tuple[float, int]:
    """Backward of one step's loss  L = Σ_rows nll / N  (N = the step's trained tokens) into ``.grad``, in
    micro-batches of ``micro_batch_size`` rows grouped by length: the gradient of one pass over all rows,
    with little padding and memory bounded by the micro-batch.  Returns (Σ nll, N)."""
    from rlhf_core.model.batches import length_buckets

    step_tokens = sum(trained_tokens(prompt, response, completion_only) for prompt, response in rows)
    step_nll = 0.0
    for members in length_buckets([len(prompt) + len(response) for prompt, response in rows], micro_batch_size):
        micro = [rows[i] for i in members]
        batch = collate([p for p, _ in micro], [r for _, r in micro], pad_id).to(device)
        nll_sum, _ = sequence_nll(model, batch, completion_only)
        (nll_sum / max(1, step_tokens)).backward()
        step_nll += nll_sum.item()
    return step_nll, step_tokens


def train_sft(model, tokenizer, encoded, params, device: torch.device, seed: int, log=print) -> dict:
    """Fine-tune ``model`` in place on ``encoded`` demonstrations; returns training metrics."""
    from transformers import get_scheduler

    from rlhf_core.runtime.stage_times import add_work

    sft = params.sft
    steps_per_epoch = math.ceil(len(encoded) / sft.batch_size)
    total_steps = steps_per_epoch * sft.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=sft.lr, weight_decay=sft.weight_decay, betas=(0.9, 0.95))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=int(sft.warmup_ratio * total_steps),
                              num_training_steps=max(1, total_steps))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    progress = Progress(total_steps, "sft", unit="step")
    loop_started = time.perf_counter()
    for epoch in range(sft.epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        epoch_loss, epoch_tokens = 0.0, 0.0
        for start in range(0, len(order), sft.batch_size):
            optimizer.zero_grad(set_to_none=True)
            step_nll, step_tokens = accumulate_gradients(model, [encoded[i] for i in order[start:start + sft.batch_size]],
                                                         sft.micro_batch_size, tokenizer.pad_token_id,
                                                         sft.completion_only_loss, device)
            loss = step_nll / max(1, step_tokens)
            if not math.isfinite(loss):
                raise FloatingPointError(f"sft epoch {epoch + 1}: loss is {loss}; lower sft.lr")
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            epoch_loss += step_nll
            epoch_tokens += step_tokens
            progress.update(epoch=f"{epoch + 1}/{sft.epochs}", loss=loss)
        losses.append(epoch_loss / max(1.0, epoch_tokens))
        log(f"sft epoch {epoch + 1}/{sft.epochs}: loss {losses[-1]:.4f}")
    progress.close()
    if total_steps:  # the stage's sft_steps_per_s measure (none for a snapshot: epochs 0)
        add_work("sft_steps", total_steps, time.perf_counter() - loop_started)
    return {"train_loss": losses[-1] if losses else None, "epochs": sft.epochs, "steps": total_steps}


@torch.inference_mode()
def perplexity(model, tokenizer, encoded, device: torch.device, batch_size: int = 64) -> float:
    """exp(mean NLL per response token, EOS included) of held-out (prompt, response) pairs at T = 1."""
    total_nll, total_tokens = 0.0, 0.0
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start:start + batch_size]
        batch = collate([p for p, _ in rows], [r for _, r in rows], tokenizer.pad_token_id).to(device)
        nll_sum, count = sequence_nll(model, batch, completion_only=True)
        total_nll += nll_sum.item()
        total_tokens += count.item()
    return math.exp(total_nll / max(1.0, total_tokens))


def foreign_demonstrations(sft) -> str | None:
    """Why the held-out demonstrations say nothing of the policy (None when they do): a model snapshot as it is
    (sft.epochs 0) with the project's built-in demonstrations, which it never saw; its perplexity on them
    would be a number about another corpus."""
    if sft.model != "builtin" and sft.epochs == 0 and sft.demonstrations == "builtin":
        return ("perplexity skipped: sft.epochs is 0 and sft.demonstrations is builtin, so the held-out texts are "
                "the project's own demonstrations, not the policy's; set sft.demonstrations to your data to get it")
    return None
