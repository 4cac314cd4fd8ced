"""The reference snapshot π_ref: train a tiny model from scratch, fine-tune an HF model, or snapshot it."""

from rlhf_core.io import atomic_dir, write_json, write_parquet_into
from rlhf_core.phases.data import read_demonstrations, split_heldout
from rlhf_core.runtime.cli import log, ready, run_stage


def main(params, args):
    """Train (or snapshot) the SFT reference into models/sft."""
    import pandas as pd

    from rlhf_core.model.device import resolve_device, seed_everything
    from rlhf_core.model.loading import quiet_transformers
    from rlhf_core.phases.sft import (
        build_reference,
        encode_demonstrations,
        foreign_demonstrations,
        perplexity,
        train_sft,
    )

    quiet_transformers()
    seed = params.round_seed("sft", "sft")
    seed_everything(seed)
    device = resolve_device(params.device, params.cpu_threads)
    train_rows, heldout_rows = split_heldout(read_demonstrations(params), params.sft.heldout_fraction, params.seed)
    model, tokenizer = build_reference(params, train_rows, device, log=log)
    ready()
    log(f"sft: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_rows)} demonstrations, "
        f"device {device}")
    encoded = encode_demonstrations(tokenizer, train_rows, params.sft.max_length, chat=params.chat)
    metrics = train_sft(model, tokenizer, encoded, params, device, seed, log=log)
    skip_perplexity = foreign_demonstrations(params.sft)
    if skip_perplexity:
        log(f"sft: {skip_perplexity}")
    else:
        metrics["heldout_perplexity"] = perplexity(model, tokenizer, encode_demonstrations(
            tokenizer, heldout_rows, params.sft.max_length, chat=params.chat), device)
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    with atomic_dir("models/sft") as out:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    with atomic_dir("demos") as out:
        write_parquet_into(out, "heldout.parquet", pd.DataFrame(heldout_rows))
    write_json("metrics/sft.json", metrics)


if __name__ == "__main__":
    run_stage(main, name="sft")
