"""Score the round's responses: one column per reward component, plus the total."""

from rlhf_core.cli import log, run_stage
from rlhf_core.io import atomic_dir, read_parquet, write_json


def main(params, args):
    """Score rollouts/<round> into scores/<round>/scores.parquet."""
    import pandas as pd

    from rlhf_core.rewards import score_responses

    round_key = args.round
    rollouts = read_parquet(f"rollouts/{round_key}/rollouts.parquet", ("response", "ended_with_eos"))
    components = score_responses(params.score.scorer, rollouts["response"].tolist(),
                                 rollouts["ended_with_eos"].astype(bool).tolist(), params.score.missing_eos_penalty,
                                 where=f"score@{round_key}")
    table = pd.DataFrame({"prompt_index": rollouts["prompt_index"], "sample_index": rollouts["sample_index"],
                          **components})
    metrics = {f"{name}_mean": float(table[name].mean()) for name in components}
    metrics["total_std"] = float(table["total"].std(ddof=0))
    log(f"score@{round_key}: {metrics}")
    with atomic_dir(f"scores/{round_key}") as out:
        table.to_parquet(out / "scores.parquet", index=False)
    write_json(f"metrics/{round_key}/score.json", metrics)


if __name__ == "__main__":
    run_stage(main, name="score", needs_round=True)
