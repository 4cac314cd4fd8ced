"""Evaluate one checkpoint (the SFT snapshot or a round's policy) on held-out prompts with fixed sampling seeds.

One cached stage per checkpoint (evaluate_sft, evaluate@<round>): adding a round evaluates only that round, and
eval_summary gathers the results."""

from rlhf_core.io import atomic_dir, read_parquet, write_json_into
from rlhf_core.runtime.cli import log, ready, run_stage


def main(params, args):
    """Write evals/<checkpoint>/metrics.json and samples.jsonl."""
    import json

    from rlhf_core.io import checkpoint_dir
    from rlhf_core.model.device import resolve_device, seed_everything
    from rlhf_core.model.loading import checkpoint_stop_ids, load_causal_lm, load_tokenizer
    from rlhf_core.phases.evaluation import evaluate_checkpoint
    from rlhf_core.phases.sft import encode_demonstrations, foreign_demonstrations

    name = args.checkpoint
    if name != "sft" and name not in params.rounds:
        from rlhf_core.errors import ConfigError

        raise ConfigError(f"--checkpoint {name!r}: must be sft or a round of params.yaml ({', '.join(params.rounds)})")
    seed_everything(params.evaluate.seed)
    device = resolve_device(params.device, params.cpu_threads)
    prompts, answers, messages, rows = read_eval_prompts(params)
    heldout = read_parquet("demos/heldout.parquet", ("prompt", "response")).to_dict("records")
    heldout = heldout[: params.evaluate.num_perplexity_texts]
    skip_perplexity = foreign_demonstrations(params.sft)
    if skip_perplexity:
        log(f"evaluate: {skip_perplexity}")
    dtype = params.compute.param_dtype
    reference = load_causal_lm(checkpoint_dir("sft"), device, params.trust_remote_code, param_dtype=dtype)
    policy = reference if name == "sft" else load_causal_lm(checkpoint_dir(name), device, params.trust_remote_code,
                                                            param_dtype=dtype)
    tokenizer = load_tokenizer(checkpoint_dir(name), params.trust_remote_code)
    ready()

    encoded = None if skip_perplexity else encode_demonstrations(tokenizer, heldout, params.sft.max_length,
                                                                chat=params.chat)
    metrics, examples = evaluate_checkpoint(policy, reference, tokenizer, prompts, encoded, params, device, answers,
                                            messages=messages, prompt_rows=rows,
                                            stop_ids=checkpoint_stop_ids(checkpoint_dir(name), tokenizer))
    log(f"evaluate {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    samples = [{"round": name, **example} for example in examples[: params.evaluate.num_logged_samples]]
    with atomic_dir(f"evals/{name}") as out:
        write_json_into(out, "metrics.json", metrics)
        (out / "samples.jsonl").write_text("".join(json.dumps(s, sort_keys=True) + "\n" for s in samples))


def read_eval_prompts(params) -> tuple[list, list | None, list | None, list | None]:
    """The first evaluate.num_prompts held-out prompts (the training ones when prepare.eval_fraction is 0, and it
    says so), with their reference answers and chat messages where the prompt set has them, and their whole rows
    for an environment's reset (None without one)."""
    eval_prompts = read_parquet("prompts/eval.parquet", ("prompt",)).head(params.evaluate.num_prompts)
    if eval_prompts.empty:  # prepare.eval_fraction 0 (or too few prompts): every prompt is a training prompt
        log("evaluate: prompts/eval.parquet is empty (prepare.eval_fraction 0), so there are no held-out prompts: "
            f"evaluating on the first {params.evaluate.num_prompts} training prompts")
        eval_prompts = read_parquet("prompts/train.parquet", ("prompt",)).head(params.evaluate.num_prompts)
    answers = [str(a) for a in eval_prompts["answer"]] if "answer" in eval_prompts else None
    messages = eval_prompts["messages"].tolist() if "messages" in eval_prompts else None
    rows = eval_prompts.to_dict("records") if params.multi_turn else None
    return eval_prompts["prompt"].tolist(), answers, messages, rows


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="`sft` or a round key from params.yaml `rounds`")


if __name__ == "__main__":
    run_stage(main, name="evaluate", add_arguments=add_arguments)
