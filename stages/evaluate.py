"""Evaluate the SFT snapshot and every round's policy on held-out prompts with fixed sampling seeds."""

from rlhf_core.cli import log, ready, run_stage
from rlhf_core.io import atomic_file, read_parquet, write_json
from rlhf_core.progress import Progress


def main(params, args):
    """Write metrics/eval.json, metrics/summary.json, plots/eval_by_round.csv and samples/eval.jsonl."""
    import json

    import pandas as pd

    from rlhf_core.evaluation import evaluate_checkpoint, summarize
    from rlhf_core.models import (checkpoint_dir, checkpoint_stop_ids, load_causal_lm, load_tokenizer, resolve_device,
                                  seed_everything)
    from rlhf_core.sft import encode_demonstrations, foreign_demonstrations

    seed_everything(params.evaluate.seed)
    device = resolve_device(params.device, params.cpu_threads)
    eval_prompts = read_parquet("prompts/eval.parquet", ("prompt",)).head(params.evaluate.num_prompts)
    if eval_prompts.empty:  # prepare.eval_fraction 0: every prompt is a training prompt
        log("evaluate: prepare.eval_fraction is 0, so there are no held-out prompts: evaluating on the first "
            f"{params.evaluate.num_prompts} training prompts")
        eval_prompts = read_parquet("prompts/train.parquet", ("prompt",)).head(params.evaluate.num_prompts)
    prompts = eval_prompts["prompt"].tolist()
    answers = [str(a) for a in eval_prompts["answer"]] if "answer" in eval_prompts else None
    messages = eval_prompts["messages"].tolist() if "messages" in eval_prompts else None
    heldout = read_parquet("demos/heldout.parquet", ("prompt", "response")).to_dict("records")
    heldout = heldout[: params.evaluate.num_perplexity_texts]
    skip_perplexity = foreign_demonstrations(params.sft)
    if skip_perplexity:
        log(f"evaluate: {skip_perplexity}")
    dtype = params.compute.param_dtype
    reference = load_causal_lm(checkpoint_dir("sft"), device, params.trust_remote_code, param_dtype=dtype)
    ready()

    results, rows, samples = {}, [], []
    progress = Progress(1 + len(params.rounds), "evaluate", unit="checkpoint")
    for name in ["sft", *params.rounds]:
        tokenizer = load_tokenizer(checkpoint_dir(name), params.trust_remote_code)
        policy = reference if name == "sft" else load_causal_lm(checkpoint_dir(name), device, params.trust_remote_code,
                                                                param_dtype=dtype)
        encoded = None if skip_perplexity else encode_demonstrations(tokenizer, heldout, params.sft.max_length,
                                                                    chat=params.chat)
        metrics, examples = evaluate_checkpoint(policy, reference, tokenizer, prompts, encoded, params, device,
                                                answers, messages=messages,
                                                stop_ids=checkpoint_stop_ids(checkpoint_dir(name), tokenizer))
        results[name] = metrics
        rows.append({"round": name, "step": params.round_index(name), **metrics})
        samples += [{"round": name, **example} for example in examples[: params.evaluate.num_logged_samples]]
        log(f"evaluate {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        progress.update(checkpoint=name, reward=metrics["reward"], kl=metrics["kl"])
    progress.close()

    with atomic_file("plots/eval_by_round.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
    with atomic_file("samples/eval.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(s, sort_keys=True) + "\n" for s in samples))
    write_json("metrics/eval.json", results)
    write_json("metrics/summary.json", summarize(results, final=list(params.rounds)[-1]))


if __name__ == "__main__":
    run_stage(main, name="evaluate")
