"""The optimizer every update loop shares (the policy optimizers, reward-model training): AdamW with a
transformers learning-rate schedule.  It imports nothing else of the project."""

from __future__ import annotations

import torch


def make_optimizer(parameters, lr: float, eps: float, weight_decay: float, schedule: str, warmup_steps: int,
                   total_steps: int, scaled: set[int] = frozenset(), lr_scale: float = 1.0):
    """AdamW with a transformers LR schedule (constant, linear or cosine decay to 0).  The parameters whose
    ``id`` is in ``scaled`` (LoRA adapters) learn at ``lr × lr_scale``, the rest at ``lr``.

    One param group per (learning rate, dtype), in the parameters' order: AdamW's update is per parameter, so
    the split changes no number, but DeepSpeed's ZeRO flattens each group into one buffer, which needs a single
    dtype (bfloat16 weights with the float32 value head are two groups)."""
    from transformers import get_scheduler

    groups: dict[tuple[bool, torch.dtype], dict] = {}
    for p in parameters:
        is_scaled = id(p) in scaled
        groups.setdefault((is_scaled, p.dtype), {"params": [], "lr": lr * lr_scale if is_scaled else lr})["params"].append(p)
    ordered = sorted(groups.items(), key=lambda item: item[0][0])  # stable: unscaled groups first, as before
    optimizer = torch.optim.AdamW([group for _, group in ordered], lr=lr, eps=eps, weight_decay=weight_decay)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps,
                              num_training_steps=max(1, total_steps))
    return optimizer, scheduler


# Inside a round's checkpoint when optim.carry_state is on; in a subdirectory, so that a loader that takes every
# *.safetensors file of the checkpoint (vLLM) does not take it for weights.
OPTIMIZER_STATE_FILE = "optimizer/state.safetensors"


def save_optimizer_state(directory, state: dict) -> None:
    """Write an optimizer's per-parameter state ``{parameter name: {"step"|"exp_avg"|"exp_avg_sq": tensor}}`` to
    ``directory``/optimizer/state.safetensors (safetensors: no pickle), one tensor per ``<parameter name>::<name>``."""
    from pathlib import Path

    from safetensors.torch import save_file

    tensors = {f"{parameter}::{name}": value.detach().cpu().contiguous()
               for parameter, values in state.items() for name, value in values.items()}
    path = Path(directory) / OPTIMIZER_STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "rlhf-optimizer-state"})


def load_optimizer_state(directory) -> dict | None:
    """The per-parameter optimizer state saved in ``directory``, or None when it holds none."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(directory) / OPTIMIZER_STATE_FILE
    if not path.is_file():
        return None
    state: dict[str, dict] = {}
    for key, value in load_file(str(path)).items():
        parameter, _, name = key.rpartition("::")
        state.setdefault(parameter, {})[name] = value
    return state
