"""Prompt and demonstration sets: load from a built-in task, a local file or a `datasets` dataset;
deduplicate, filter by length and split with a seed.  Tables are pandas DataFrames."""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlhf_core.errors import DataError
from rlhf_core.io import load_table, text_column


def truncate_text(text: str, max_chars: int) -> str:
    """The first ``max_chars`` characters, cut back to a word boundary when the cut splits a word."""
    cut = text[:max_chars]
    if len(text) > max_chars and not text[max_chars].isspace() and any(c.isspace() for c in cut):
        cut = cut[: max(i for i, c in enumerate(cut) if c.isspace())]
    return cut.rstrip()


def prompt_key(record: dict) -> str:
    """What makes two prompt records the same: the prompt text, or for a conversation the whole conversation
    as the policy will see it (its last user turn being the possibly truncated prompt)."""
    if not record.get("messages"):
        return record["prompt"]
    import json

    from rlhf_core.model.chat import conversation

    return json.dumps(conversation(record["prompt"], json.loads(record["messages"]), ""), sort_keys=True)


@dataclass
class PromptSets:
    train: object  # DataFrame with columns prompt[, answer]
    eval: object
    stats: dict


def prepare_prompts(records: list[dict], *, max_chars: int, too_long: str, eval_fraction: float, seed: int) -> PromptSets:
    """Deduplicate (first occurrence wins), drop or truncate long prompts, then split with a seed.

    ``records`` are dicts with a ``prompt`` key and optionally ``answer`` and ``messages`` (a conversation as
    JSON, whose last user turn is ``prompt``: the length limit applies to that turn).
    """
    import pandas as pd

    total = len(records)
    seen, unique = set(), []
    dropped_empty = 0
    for record in records:
        prompt = record["prompt"].strip()
        if not prompt:
            dropped_empty += 1
            continue
        record = {**record, "prompt": prompt}
        if prompt_key(record) in seen:
            continue
        seen.add(prompt_key(record))
        unique.append(record)
    duplicates = total - dropped_empty - len(unique)

    kept, too_long_count = [], 0
    for record in unique:
        if len(record["prompt"]) > max_chars:
            too_long_count += 1
            if too_long == "drop":
                continue
            record = {**record, "prompt": truncate_text(record["prompt"], max_chars)}
        kept.append(record)
    if too_long == "truncate":  # truncation can create new duplicates; the first occurrence wins again
        truncated_seen, deduplicated = set(), []
        for record in kept:
            if prompt_key(record) not in truncated_seen:
                truncated_seen.add(prompt_key(record))
                deduplicated.append(record)
        duplicates += len(kept) - len(deduplicated)
        kept = deduplicated
    if len(kept) < 2:
        raise DataError(f"only {len(kept)} usable prompt(s) after deduplication and length filtering "
                        f"(of {total}); need at least 2 to split train and eval")

    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    # eval_fraction 0: train on every prompt (no held-out set); otherwise at least one prompt on each side
    n_eval = 0 if eval_fraction == 0 else min(max(1, round(eval_fraction * len(kept))), len(kept) - 1)
    eval_rows = [kept[i] for i in order[:n_eval]]
    train_rows = [kept[i] for i in order[n_eval:]]
    stats = {
        "prompts_read": total, "empty_dropped": dropped_empty, "duplicates_removed": duplicates,
        "too_long": too_long_count, "too_long_action": too_long,
        "train_prompts": len(train_rows), "eval_prompts": len(eval_rows),
    }
    train = pd.DataFrame(train_rows)
    return PromptSets(train, pd.DataFrame(eval_rows, columns=train.columns), stats)


def read_prompt_records(params) -> list[dict]:
    """Prompt records from the source named in ``params.prepare``."""
    prep = params.prepare
    if prep.source == "builtin":
        from rlhf_core.phases.tasks import get_task

        return get_task(params.task).prompts(prep.num_builtin_prompts, params.seed)
    where = f"prepare.path {prep.path}"
    frame = load_table(prep.source, prep.path, prep.dataset_config, prep.split)
    records = prompt_column(frame, prep.prompt_field, where)
    if prep.answer_field:
        answers = [str(a) for a in frame[prep.answer_field].tolist()] if prep.answer_field in frame.columns else None
        if answers is None:
            raise DataError(f"{where}: no column {prep.answer_field!r} (prepare.answer_field); columns are "
                            f"{', '.join(map(str, frame.columns))}")
        return [{**record, "answer": a} for record, a in zip(records, answers)]
    return records


def prompt_column(frame, field: str, where: str) -> list[dict]:
    """Prompt records from one column: ``{"prompt": text}`` per row of text, or, for a column of conversations
    (lists of ``{role, content}`` messages, as in many Hub datasets), ``{"prompt": the last user turn,
    "messages": the conversation as JSON}`` (trailing assistant turns dropped; ``chat.encode_prompt`` renders
    it with the chat template).  A column must hold one kind or the other."""
    import json

    from rlhf_core.model.chat import last_user_text, parse_conversation

    if field not in frame.columns:
        raise DataError(f"{where}: no column {field!r}; columns are {', '.join(map(str, frame.columns))}")
    values = frame[field].tolist()
    if not any(not isinstance(value, str) and hasattr(value, "__len__") for value in values):
        return [{"prompt": p} for p in text_column(frame, field, where)]
    records = []
    for row, value in enumerate(values):
        if isinstance(value, str):
            raise DataError(f"{where}: column {field!r} row {row} is text while other rows are conversations; "
                            "a prompt column holds one kind")
        messages = parse_conversation(value, f"{where}: column {field!r} row {row}")
        records.append({"prompt": last_user_text(messages), "messages": json.dumps(messages, ensure_ascii=False)})
    return records


def read_demonstrations(params) -> list[dict]:
    """(prompt, response) demonstration records from the source named in ``params.sft``."""
    sft = params.sft
    if sft.demonstrations == "builtin":
        from rlhf_core.phases.tasks import get_task

        rows = get_task(params.task).demonstrations(sft.num_builtin_demonstrations, params.seed)
        # a tool task's demonstrations are whole episodes: their conversation travels as `messages` (JSON)
        return [{"prompt": r["prompt"], "response": r["response"],
                 **{key: r[key] for key in ("messages", "tools") if key in r}} for r in rows]
    where = f"sft.demo_path {sft.demo_path}"
    frame = load_table(sft.demonstrations, sft.demo_path, sft.demo_dataset_config, sft.demo_split)
    responses = text_column(frame, sft.demo_response_field, where)
    if sft.demo_prompt_field:
        prompts = text_column(frame, sft.demo_prompt_field, where)
    else:  # plain text: its opening is the prompt, the rest the response (continuation tasks)
        prompts = [truncate_text(text, sft.demo_prompt_chars) for text in responses]
        responses = [text[len(prompt):] for prompt, text in zip(prompts, responses)]
    rows = [{"prompt": p, "response": r} for p, r in zip(prompts, responses) if p.strip() and r.strip()]
    if len(rows) < 2:
        raise DataError(f"{where}: {len(rows)} non-empty demonstration(s); need at least 2")
    return rows


def split_heldout(rows: list[dict], fraction: float, seed: int, salt: str = "heldout") -> tuple[list[dict], list[dict]]:
    """Seeded split of records (demonstrations, preference pairs) into (train, held-out); both non-empty."""
    order = list(range(len(rows)))
    random.Random(f"{salt}-{seed}").shuffle(order)
    n_heldout = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    return [rows[i] for i in order[n_heldout:]], [rows[i] for i in order[:n_heldout]]
