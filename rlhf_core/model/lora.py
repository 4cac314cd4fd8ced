"""LoRA (peft): the adapters a round trains on a frozen base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rlhf_core.model.loading import (
    adapter_base,
    disable_dropout,
    is_adapter_checkpoint,
    meta_copies_quiet,
    safe_from_pretrained,
)


def lora_config(lora):
    """peft LoraConfig from the ``lora`` params (causal LM task, no bias training)."""
    from peft import LoraConfig

    targets = lora.target_modules.strip()
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target_modules,
                      bias="none", task_type="CAUSAL_LM")


def trainable_lora_policy(path: str, lora, device: torch.device, trust_remote_code: bool = False,
                          param_dtype: str = "float32"):
    """The policy of a LoRA round: the adapters of ``path`` (an adapter checkpoint: they keep training, on the
    same base) or new zero-initialised adapters on the full model at ``path``.  Only the adapters train."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    empty = device.type == "meta"  # the structure only (see safe_from_pretrained)
    if is_adapter_checkpoint(path):
        base_path = adapter_base(path)
        base = disable_dropout(safe_from_pretrained(AutoModelForCausalLM, base_path, trust_remote_code,
                                                    param_dtype=param_dtype, empty=empty, device=device))
        with meta_copies_quiet(empty):
            policy = PeftModel.from_pretrained(base, path, is_trainable=True)
    else:
        base_path = path
        base = disable_dropout(safe_from_pretrained(AutoModelForCausalLM, path, trust_remote_code,
                                                    param_dtype=param_dtype, empty=empty, device=device))
        policy = get_peft_model(base, lora_config(lora))
    # The checkpoint points at its base: a local directory as an absolute path, so plain peft loads the adapters
    # from any working directory (adapter_base still finds a moved repo's models/sft next to the checkpoint).
    local = Path(base_path).expanduser()
    policy.peft_config["default"].base_model_name_or_path = str(local.resolve()) if local.is_dir() else str(base_path)
    policy.eval()  # dropout off, as everywhere; only the adapters' own dropout (lora.dropout) acts in updates
    for name, module in policy.named_modules():
        if name.endswith("lora_dropout.default") and isinstance(module, nn.Dropout) and module.p > 0:
            module.train()
    return policy.to(device)
