"""Train a Bradley–Terry reward model on preference pairs into reward_models/<name>."""

from rlhf_core.errors import ConfigError
from rlhf_core.io import atomic_dir, write_json
from rlhf_core.runtime.cli import log, ready, run_stage


def main(params, args):
    """Train reward model <name> (params reward_models.<name>) and report its held-out pair accuracy."""
    from rlhf_core.model.device import resolve_device, seed_everything
    from rlhf_core.model.loading import enable_gradient_checkpointing, quiet_transformers
    from rlhf_core.phases.reward_model import (
        build_reward_model,
        pair_accuracy,
        pair_texts,
        read_preferences,
        split_pairs,
        train_bradley_terry,
    )

    if args.name not in params.reward_models:
        raise ConfigError(f"--name {args.name!r}: not in params reward_models ({', '.join(params.reward_models) or 'empty'})")
    spec = params.reward_models[args.name]
    quiet_transformers()
    seed = params.round_seed(f"reward-{args.name}", "train_reward")
    seed_everything(seed)
    device = resolve_device(params.device, params.cpu_threads)
    train_rows, heldout_rows = split_pairs(read_preferences(spec, params.task, params.seed), spec.heldout_fraction,
                                           params.seed)
    chosen, rejected = pair_texts(train_rows)
    model, tokenizer = build_reward_model(spec, params.sft.tiny, chosen + rejected, device, params.trust_remote_code)
    if params.compute.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    ready()
    log(f"train_reward@{args.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(train_rows)} train / {len(heldout_rows)} held-out pairs, device {device}")
    before = pair_accuracy(model, tokenizer, heldout_rows, spec.max_length)["pair_accuracy"]
    metrics = train_bradley_terry(model, tokenizer, train_rows, spec, seed, log=log)
    metrics.update({f"heldout_{key}": value for key, value in
                    pair_accuracy(model, tokenizer, heldout_rows, spec.max_length).items()})
    metrics["heldout_pair_accuracy_before"] = before
    metrics["train_pairs"], metrics["heldout_pairs"] = len(train_rows), len(heldout_rows)
    log(f"train_reward@{args.name}: held-out pair accuracy {before:.3f} -> {metrics['heldout_pair_accuracy']:.3f}")
    with atomic_dir(f"reward_models/{args.name}") as out:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    write_json(f"metrics/reward_models/{args.name}.json", metrics)


def add_arguments(parser):
    parser.add_argument("--name", required=True, help="reward model key from params.yaml `reward_models`, e.g. bt")


if __name__ == "__main__":
    run_stage(main, name="train_reward", add_arguments=add_arguments)
