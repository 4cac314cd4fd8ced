"""Reward models: score text with any AutoModelForSequenceClassification, and train one from preferences.

Scoring (the ``hf_classifier`` scorer).  The classifier reads the decoded text (prompt + response, or
the response alone) re-tokenised with its *own* tokenizer, which need not be the policy's.  Inputs
longer than ``max_length`` keep their end (the response).  The score of text x is

    logit:        z_label(x)
    probability:  softmax(z(x))_label,  or σ(z(x)) for a one-output model

and an ensemble of models m = 1…M combines them per response as mean_m s_m(x) or min_m s_m(x).

Training (the ``train_reward`` stage).  A one-output classifier r_φ is fitted to preference pairs
(x, y_chosen, y_rejected) with the Bradley–Terry loss

    L(φ) = −E[ log σ( r_φ(x, y_chosen) − r_φ(x, y_rejected) ) ]

and reported by its held-out pair accuracy P[r_φ(x, y_chosen) > r_φ(x, y_rejected)].
"""

from __future__ import annotations

import inspect
import math

import torch

from rlhf_core.errors import DataError
from rlhf_core.runtime.progress import Progress

REWARD_LABEL = "reward"
ADAMW_EPS = 1e-8  # torch's AdamW default
_LOADED: dict[tuple, tuple] = {}  # (path, device, trust_remote_code, allow_untrained_head) -> (model, tokenizer)


# ---------------------------------------------------------------------------------------------------
# Loading


def prepare_classifier_tokenizer(tokenizer, model=None):
    """Give the tokenizer a pad token (its EOS, else UNK) without adding tokens the model cannot embed,
    pad on the right (absolute position embeddings then see the same positions as for an unpadded
    text), truncate from the left so the response survives, and tell the model which id is padding.

    A model whose config names a pad id gets batches padded with that id: its classifier scores the last
    token that is not that id, so padding with another one (a tokenizer whose pad is its EOS) would score a
    padding position of every shorter text."""
    model_pad = None if model is None else model.config.pad_token_id
    if model_pad is not None and model_pad != tokenizer.pad_token_id and model_pad < len(tokenizer):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(model_pad))
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise DataError(f"tokenizer {tokenizer.name_or_path!r}: has no pad, EOS or UNK token to pad batches with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    if model is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_classifier(path: str, device: torch.device, trust_remote_code: bool = False, *,
                    allow_untrained_head: bool = False, where: str = "reward model"):
    """(model, tokenizer) of an AutoModelForSequenceClassification, loaded once per process.

    A checkpoint that lacks some of the classifier's weights (a sentence encoder or a plain LM loaded as a
    classifier: transformers initialises the missing head at random, with only a warning) scores noise,
    so it is refused unless ``allow_untrained_head``."""
    key = (str(path), str(device), trust_remote_code, allow_untrained_head)
    if key not in _LOADED:
        from transformers import AutoModelForSequenceClassification

        from rlhf_core.model.loading import auto_tokenizer, disable_dropout, safe_from_pretrained

        model, loading = safe_from_pretrained(AutoModelForSequenceClassification, path, trust_remote_code,
                                              output_loading_info=True)
        untrained = sorted(set(loading.get("missing_keys") or ()) | {
            name[0] if isinstance(name, tuple) else name for name in loading.get("mismatched_keys") or ()})
        if untrained and not allow_untrained_head:
            shown = ", ".join(untrained[:3]) + (f" and {len(untrained) - 3} more" if len(untrained) > 3 else "")
            raise DataError(f"{where}: {path!r} is not a trained classifier: its checkpoint lacks {shown}, which would "
                            "start at random (scores would be noise); train one (reward_models) or set "
                            "allow_untrained_head: true")
        model = disable_dropout(model)
        tokenizer = auto_tokenizer(path, trust_remote_code, f"{where}: the tokenizer of")
        _LOADED[key] = (model.to(device), prepare_classifier_tokenizer(tokenizer, model))
    return _LOADED[key]


def label_index(config, label: str, where: str) -> int:
    """The output column scored: the only one of a one-output model, else ``label`` by name or index."""
    num_labels = int(config.num_labels)
    if not label:
        if num_labels == 1:
            return 0
        names = ", ".join(str(config.id2label[i]) for i in range(num_labels))
        raise DataError(f"{where}: the model has {num_labels} outputs ({names}); set label to one of them")
    if label.isdigit():
        if int(label) >= num_labels:
            raise DataError(f"{where}: label {label} is out of range; the model has {num_labels} outputs")
        return int(label)
    by_name = {str(name): int(index) for index, name in config.id2label.items()}
    if label not in by_name:
        raise DataError(f"{where}: label {label!r} is not one of the model's labels ({', '.join(by_name)})")
    return by_name[label]


def _model_inputs(model, encoded) -> dict:
    """The tokenizer's outputs that the model's forward accepts (e.g. no token_type_ids for Llama)."""
    accepted = inspect.signature(model.forward).parameters
    return {name: tensor for name, tensor in encoded.items() if name in accepted}


# ---------------------------------------------------------------------------------------------------
# Scoring


def conversation_texts(tokenizer, pairs: list[tuple[str, str]], where: str) -> list[str]:
    """Each (prompt, response) as the reward model's own chat template renders a user turn and the assistant's
    answer (``text: conversation``): what chat reward models (Skywork, ArmoRM, …) were trained to read."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: text = 'conversation' needs a reward model whose tokenizer has a chat template; "
                        "this one has none (use prompt_and_response or response)")
    return [tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                          tokenize=False) for prompt, response in pairs]


@torch.inference_mode()
def classifier_logits(model, tokenizer, texts: list[str], *, batch_size: int, max_length: int,
                      add_special_tokens: bool = True) -> torch.Tensor:
    """[N, num_labels] float32 logits, computed in length-sorted batches (little padding) and returned
    in the order of ``texts`` (already templated texts carry their special tokens: ``add_special_tokens`` off)."""
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    logits = torch.empty(len(texts), int(model.config.num_labels))
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        encoded = tokenizer([texts[i] for i in members], padding=True, truncation=True, max_length=max_length,
                            add_special_tokens=add_special_tokens, return_tensors="pt").to(device)
        logits[members] = model(**_model_inputs(model, encoded)).logits.float().cpu()
    return logits


def classifier_scores(texts: list[str], scorer, device: torch.device, trust_remote_code: bool = False, *,
                      pairs: list[tuple[str, str]] | None = None) -> tuple[list[float], list[list[float]]]:
    """The ``hf_classifier`` component of each text, and each ensemble member's own scores.  With
    ``scorer.text == "conversation"`` the texts are the (prompt, response) ``pairs`` rendered by each member's
    own chat template."""
    members = []
    for path in scorer.model:
        model, tokenizer = load_classifier(path, device, trust_remote_code,
                                           allow_untrained_head=scorer.allow_untrained_head,
                                           where=f"scorer {scorer.name}")
        column = label_index(model.config, scorer.label, f"scorer {scorer.name} ({path})")
        templated = scorer.text == "conversation"
        member_texts = conversation_texts(tokenizer, pairs, f"scorer {scorer.name} ({path})") if templated else texts
        logits = classifier_logits(model, tokenizer, member_texts, batch_size=scorer.batch_size,
                                   max_length=scorer.max_length, add_special_tokens=not templated)
        if scorer.output == "logit":
            values = logits[:, column]
        elif logits.shape[1] == 1:
            values = torch.sigmoid(logits[:, 0])
        else:
            values = logits.softmax(-1)[:, column]
        members.append(values)
    stacked = torch.stack(members)  # [M, N]
    combined = stacked.mean(0) if scorer.ensemble == "mean" else stacked.min(0).values
    return combined.tolist(), stacked.tolist()


# ---------------------------------------------------------------------------------------------------
# Preference data


def read_preferences(spec, task: str, seed: int) -> list[dict]:
    """(prompt, chosen, rejected) records from the task's generator, a file or a `datasets` dataset."""
    if spec.preferences == "builtin":
        from rlhf_core.phases.tasks import get_task

        return get_task(task).preferences(spec.num_builtin_pairs, seed)
    from rlhf_core.io import load_table, text_column

    where = f"reward model preferences {spec.path}"
    frame = load_table(spec.preferences, spec.path, spec.dataset_config, spec.split)
    chosen = text_column(frame, spec.chosen_field, where)
    rejected = text_column(frame, spec.rejected_field, where)
    prompts = text_column(frame, spec.prompt_field, where) if spec.prompt_field else [""] * len(chosen)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, chosen, rejected)
            if c.strip() and r.strip() and c != r]
    if len(rows) < 2:
        raise DataError(f"{where}: {len(rows)} usable pair(s) (non-empty, chosen != rejected); need at least 2")
    return rows


def split_pairs(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split of preference pairs into (train, held-out), both non-empty."""
    from rlhf_core.phases.data import split_heldout

    return split_heldout(rows, fraction, seed, salt="preferences")


# ---------------------------------------------------------------------------------------------------
# Training


def build_reward_model(spec, tiny, texts: list[str], device: torch.device, trust_remote_code: bool = False):
    """(model, tokenizer): a one-output sequence classifier, from scratch (``builtin``, with its own
    tokenizer trained on ``texts``), from the SFT snapshot (``sft``), or from any hub id / directory."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_core.model.loading import (
        auto_tokenizer,
        build_tiny_model,
        disable_dropout,
        safe_from_pretrained,
        train_tokenizer,
    )

    labels = {"num_labels": 1, "id2label": {0: REWARD_LABEL}, "label2id": {REWARD_LABEL: 0}}
    if spec.base == "builtin":
        tokenizer = train_tokenizer(texts, spec.reward_vocab_size)
        lm_config = build_tiny_model(tiny, tokenizer).config  # the same architecture family as the policy
        for key, value in labels.items():
            setattr(lm_config, key, value)
        model = AutoModelForSequenceClassification.from_config(lm_config)
    else:
        path = "models/sft" if spec.base == "sft" else spec.base
        model = safe_from_pretrained(AutoModelForSequenceClassification, path, trust_remote_code,
                                     ignore_mismatched_sizes=True, **labels)
        tokenizer = auto_tokenizer(path, trust_remote_code, "the tokenizer of reward model base")
    prepare_classifier_tokenizer(tokenizer, model)
    return disable_dropout(model).to(device), tokenizer


def pair_texts(rows: list[dict]) -> tuple[list[str], list[str]]:
    """prompt + chosen and prompt + rejected: exactly what the hf_classifier scorer reads."""
    return [r["prompt"] + r["chosen"] for r in rows], [r["prompt"] + r["rejected"] for r in rows]


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """−mean log σ(r_chosen − r_rejected), shapes [B] and [B] → scalar."""
    return -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards).mean()


def _rewards(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    device = next(model.parameters()).device
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
    return model(**_model_inputs(model, encoded)).logits[:, 0].float()


def pair_accuracy(model, tokenizer, rows: list[dict], max_length: int, batch_size: int = 64) -> dict:
    """Held-out pair accuracy P[r(chosen) > r(rejected)] and the mean margin r(chosen) − r(rejected)."""
    chosen, rejected = pair_texts(rows)
    chosen_rewards = classifier_logits(model, tokenizer, chosen, batch_size=batch_size, max_length=max_length)[:, 0]
    rejected_rewards = classifier_logits(model, tokenizer, rejected, batch_size=batch_size, max_length=max_length)[:, 0]
    margins = chosen_rewards - rejected_rewards
    return {"pair_accuracy": float((margins > 0).float().mean()), "mean_margin": float(margins.mean()),
            "reward_mean": float(torch.cat([chosen_rewards, rejected_rewards]).mean()),
            "reward_std": float(torch.cat([chosen_rewards, rejected_rewards]).std())}


def train_bradley_terry(model, tokenizer, train_rows: list[dict], spec, seed: int, log=print) -> dict:
    """Fit ``model`` in place with the Bradley–Terry loss; returns training metrics."""
    from rlhf_core.rl.optim import make_optimizer

    steps_per_epoch = math.ceil(len(train_rows) / spec.batch_size)
    total_steps = steps_per_epoch * spec.epochs
    optimizer, scheduler = make_optimizer(model.parameters(), spec.lr, ADAMW_EPS, spec.weight_decay, "cosine",
                                          int(spec.warmup_ratio * total_steps), total_steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    progress = Progress(total_steps, "reward model", unit="step")
    for epoch in range(spec.epochs):
        order = torch.randperm(len(train_rows), generator=generator).tolist()
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), spec.batch_size):
            rows = [train_rows[i] for i in order[start:start + spec.batch_size]]
            chosen, rejected = pair_texts(rows)
            rewards = _rewards(model, tokenizer, chosen + rejected, spec.max_length)
            chosen_rewards, rejected_rewards = rewards[: len(rows)], rewards[len(rows):]
            loss = bradley_terry_loss(chosen_rewards, rejected_rewards)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"reward model epoch {epoch + 1}: loss is {loss.item()}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(rows)
            correct += int((chosen_rewards > rejected_rewards).sum())
            progress.update(epoch=f"{epoch + 1}/{spec.epochs}", loss=loss.item())
        log(f"reward model epoch {epoch + 1}/{spec.epochs}: loss {loss_sum / len(train_rows):.4f}, "
            f"train pair accuracy {correct / len(train_rows):.3f}")
    progress.close()
    model.eval()
    return {"train_loss": loss_sum / len(train_rows), "train_pair_accuracy": correct / len(train_rows),
            "steps": total_steps, "epochs": spec.epochs}
