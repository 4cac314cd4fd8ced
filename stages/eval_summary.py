"""Gather every checkpoint's evaluation (evals/<checkpoint>, one cached stage each) into the eval metrics."""

from rlhf_core.io import atomic_file, read_json, write_json
from rlhf_core.runtime.cli import ready, run_stage


def main(params, args):
    """Write metrics/eval.json, metrics/summary.json, plots/eval_by_round.csv and samples/eval.jsonl."""
    from pathlib import Path

    import pandas as pd

    names = ["sft", *params.rounds]
    results = {name: read_json(f"evals/{name}/metrics.json") for name in names}
    ready()
    rows = [{"round": name, "step": params.round_index(name), **dict(sorted(results[name].items(), key=column_order))}
            for name in names]
    with atomic_file("plots/eval_by_round.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
    with atomic_file("samples/eval.jsonl") as tmp:
        tmp.write_text("".join(Path(f"evals/{name}/samples.jsonl").read_text() for name in names))
    write_json("metrics/eval.json", results)
    write_json("metrics/summary.json", summarize(results, final=names[-1]))


def summarize(results: dict[str, dict], final: str) -> dict:
    """The final checkpoint's eval metrics, plus its reward gain over SFT: the one DVC metric file."""
    summary = {"checkpoint": final, **results[final]}
    summary["reward_gain"] = results[final]["reward"] - results["sft"]["reward"]
    return summary


# The plot table's columns in evaluate_checkpoint's order (metrics.json is written with sorted keys).
COLUMNS = ("reward", "reward_*", "kl", "perplexity", "distinct_1", "distinct_2", "length", "eos_fraction", "exact_match")


def column_order(item) -> tuple:
    name = item[0]
    group = "reward_*" if name.startswith("reward_") else name
    return (COLUMNS.index(group) if group in COLUMNS else len(COLUMNS), name)


if __name__ == "__main__":
    run_stage(main, name="eval_summary")
