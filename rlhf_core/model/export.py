"""Write a round's policy as one plain transformers model for serving (vLLM, TGI, ``pipeline``, …).

    python -m rlhf_core.model.export models/r3 exported/r3

A LoRA checkpoint (adapters + value head, pointing at its base models/sft) is loaded on its base and
the adapters are merged into the weights (peft ``merge_and_unload``); a full checkpoint is copied as
the model it already is.  The output holds model.safetensors, config.json and the tokenizer: any
``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it, with no peft and no value head.  Run it from
the repository root, where the adapters' relative base path (models/sft) resolves.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlhf_core.errors import RLHFError


def export_merged(checkpoint: str, out_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """Merge ``checkpoint``'s adapters (if any) and save the plain model + tokenizer into ``out_dir`` (atomically)."""
    import torch

    from rlhf_core.io import atomic_dir
    from rlhf_core.model.loading import load_causal_lm, load_tokenizer, quiet_transformers

    quiet_transformers()
    model = load_causal_lm(checkpoint, torch.device("cpu"), trust_remote_code, merge_adapters=True)
    tokenizer = load_tokenizer(checkpoint, trust_remote_code)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rlhf_core.model.export",
                                     description="Write a checkpoint (LoRA adapters merged) as one plain model.")
    parser.add_argument("checkpoint", help="a checkpoint directory, e.g. models/r3")
    parser.add_argument("out_dir", help="where the merged model and its tokenizer go")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_dir():
        print(f"error: export: {args.checkpoint}: not a checkpoint directory", file=sys.stderr)
        sys.exit(2)
    try:
        out = export_merged(args.checkpoint, args.out_dir, args.trust_remote_code)
    except RLHFError as exc:
        print(f"error: export: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"export: {args.checkpoint} → {out} (merged, loadable with AutoModelForCausalLM)", file=sys.stderr)


if __name__ == "__main__":
    main()
