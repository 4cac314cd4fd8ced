"""Prompts as the model expects them: its chat template, its BOS token, and every token id that ends its turn.

An instruct model (Llama, Qwen, SmolLM, Mistral, Gemma, …) was trained on conversations rendered by its chat
template, and it ends a turn with an end-of-turn id that may differ from the tokenizer's EOS (Llama 3:
``<|eot_id|>`` and ``<|end_of_text|>``; ``generation_config.eos_token_id`` is often a list).  Raw text is
what a base model or the from-scratch default expects.  The ``chat`` params choose:

- ``template: auto`` renders each prompt with the tokenizer's chat template (``add_generation_prompt``) when
  the tokenizer has one, and feeds the raw text otherwise; ``on`` requires a template; ``off`` never uses one.
- ``system_prompt`` opens every templated conversation with a system turn (empty: none).

A prompt is either text (one user turn) or a conversation (a list of ``{"role", "content"}`` messages, from a
``messages``-style column); scorers always receive the plain prompt text (the last user turn) and the decoded
response, never the template markup.  Every function here is the one place its rule lives: sft, rollout and
evaluate all encode prompts through ``encode_prompt``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from rlhf_core.errors import DataError

CHAT_TEMPLATE_MODES = ("auto", "on", "off")
ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------------------------------
# Conversations


def parse_conversation(value, where: str) -> list[dict]:
    """A prompt given as messages (a list of ``{"role", "content"}``, or its JSON text) as a list of plain dicts,
    trailing assistant turns dropped (many datasets store the whole exchange; the policy answers the last
    user turn).  Anything else is one line naming ``where``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: is not a JSON list of messages") from None
    if hasattr(value, "tolist"):  # numpy arrays from Parquet list columns
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages, got "
                        f"{type(value).__name__}")
    messages = []
    for number, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            raise DataError(f"{where}: message {number} is not a {{role, content}} dict with role one of "
                            f"{', '.join(ROLES)}")
        messages.append({"role": message["role"], "content": message["content"]})
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: has no user turn to answer")
    return messages


def last_user_text(messages: Sequence[dict]) -> str:
    """The text of the last user turn: what scorers read as the prompt of a conversation."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def conversation(prompt: str, messages: Sequence[dict] | None, system_prompt: str) -> list[dict]:
    """The messages to render: the stored conversation (with its last user turn set to ``prompt``, which prepare
    may have truncated), or one user turn; ``system_prompt`` opens it unless the conversation has a system
    turn of its own."""
    if messages:
        turns = [dict(m) for m in messages]
        turns[max(i for i, m in enumerate(turns) if m["role"] == "user")]["content"] = prompt
    else:
        turns = [{"role": "user", "content": prompt}]
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


# ---------------------------------------------------------------------------------------------------
# Encoding


def uses_chat_template(tokenizer, mode: str) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template under ``chat.template = mode``."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat template mode {mode!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has_template:
        raise DataError("chat.template = 'on': the policy's tokenizer has no chat template; use auto or off, "
                        "or a model whose tokenizer_config.json has one")
    return mode != "off" and has_template


def needs_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding starts a text with BOS (Llama, Gemma, Mistral): the model was
    trained with it, so a prompt encoded without special tokens must get it back."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def encode_prompt(tokenizer, prompt: str, *, chat, messages: Sequence[dict] | None = None,
                  bos: bool | None = None) -> list[int]:
    """Token ids of one prompt, as the policy sees it before its response.

    With the chat template (``chat.template``, see ``uses_chat_template``): the conversation rendered with
    ``add_generation_prompt=True``, so the ids end where the assistant's turn begins.  Without it: the raw
    text.  Either way the text is tokenised without special tokens and BOS is put first when the tokenizer
    would add it (``needs_bos``; pass ``bos`` to skip the probe) and the template did not.
    """
    if uses_chat_template(tokenizer, chat.template):
        text = tokenizer.apply_chat_template(conversation(prompt, messages, chat.system_prompt), tokenize=False,
                                             add_generation_prompt=True)
    elif messages and len(messages) > 1:
        raise DataError("a prompt is a conversation of several turns, but chat.template is off or the policy's "
                        "tokenizer has no chat template; use a model with one, or plain-text prompts")
    else:
        text = prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if (needs_bos(tokenizer) if bos is None else bos) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat, messages: Sequence | None = None) -> list[list[int]]:
    """``encode_prompt`` of every prompt; ``messages`` (one JSON text or None per prompt) where prompts came
    from a conversation column."""
    bos = needs_bos(tokenizer)
    conversations = [None] * len(prompts) if messages is None else [
        parse_conversation(m, f"prompt row {row} messages") if m is not None else None
        for row, m in enumerate(messages)]
    return [encode_prompt(tokenizer, p, chat=chat, messages=c, bos=bos) for p, c in zip(prompts, conversations)]


# ---------------------------------------------------------------------------------------------------
# End-of-turn ids and the pad token


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(tokenizer, *eos_values) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS first, then the ``eos_token_id`` values of the model's
    config and generation config (an int or a list each), without repeats."""
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, *eos_values):
        ids += [i for i in _as_ids(value) if i not in ids]
    return ids


def spare_pad_token(tokenizer, exclude_ids: Iterable[int], vocab_rows: int) -> str | None:
    """A special token the model never needs to produce, to use as pad without growing the embeddings.

    Candidates are the tokenizer's special added tokens with an id below ``vocab_rows`` (the embedding
    matrix already has a row for them), that are not in ``exclude_ids`` (the end-of-turn ids), not BOS or
    UNK, and not written by the chat template.  Preferred: a token named for padding
    (``<|finetune_right_pad_id|>``, ``<pad>``), then a reserved one (``<|reserved_special_token_0|>``), then the
    lowest id.  None when there is none."""
    excluded = set(exclude_ids) | {tokenizer.bos_token_id, tokenizer.unk_token_id}
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):  # a dict of named templates
        template = " ".join(map(str, template.values())) if isinstance(template, dict) else str(template)
    candidates = []
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = getattr(token, "content", str(token))
        if not getattr(token, "special", False) or token_id in excluded or token_id >= vocab_rows:
            continue
        if content in template:
            continue
        name = content.lower()
        candidates.append((0 if "pad" in name else 1 if "reserved" in name else 2, token_id, content))
    return min(candidates)[2] if candidates else None
