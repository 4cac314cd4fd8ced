"""The optimizer every update loop shares (the policy optimizers, reward-model training): AdamW with a
transformers learning-rate schedule.  It imports nothing else of the project."""

from __future__ import annotations

import torch


def make_optimizer(parameters, lr: float, eps: float, weight_decay: float, schedule: str, warmup_steps: int,
                   total_steps: int, scaled: set[int] = frozenset(), lr_scale: float = 1.0):
    """AdamW with a transformers LR schedule (constant, linear or cosine decay to 0).  The parameters whose
    ``id`` is in ``scaled`` (LoRA adapters) learn at ``lr × lr_scale``, the rest at ``lr``."""
    from transformers import get_scheduler

    parameters = list(parameters)
    groups = [{"params": [p for p in parameters if id(p) not in scaled], "lr": lr},
              {"params": [p for p in parameters if id(p) in scaled], "lr": lr * lr_scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=eps, weight_decay=weight_decay)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps,
                              num_training_steps=max(1, total_steps))
    return optimizer, scheduler
