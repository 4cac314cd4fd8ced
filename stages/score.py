"""Score the round's responses: one column per reward component (raw and normalised), plus the total."""

from rlhf_core.io import (
    atomic_dir,
    checkpoint_dir,
    read_parquet,
    read_state,
    write_json,
    write_json_into,
    write_parquet_into,
)
from rlhf_core.runtime.cli import log, ready, run_stage


def main(params, args):
    """Score rollouts/<round> into scores/<round>/scores.parquet and the normalisers' state."""
    import pandas as pd

    from rlhf_core.phases.rewards import row_metadata, score_responses

    round_key = args.round
    rollouts = read_parquet(f"rollouts/{round_key}/rollouts.parquet",
                            ("prompt", "response", "response_length", "ended_with_eos"))
    # Running normalisers travel inside the checkpoint this round starts from (none for sft).
    carried = read_state(checkpoint_dir(params.rounds[round_key].start_from)).get("reward_normalizers", {})
    ready()
    metadata = row_metadata(rollouts)  # the reference answers; an episode's messages and environment score
    components, normalizers = score_responses(
        params.score.scorers, prompts=rollouts["prompt"].tolist(), responses=rollouts["response"].tolist(),
        lengths=rollouts["response_length"].tolist(), ended=rollouts["ended_with_eos"].astype(bool).tolist(),
        metadata=metadata, missing_eos_penalty=params.score.missing_eos_penalty, task=params.task, state=carried,
        cpu_threads=params.cpu_threads, trust_remote_code=params.trust_remote_code,
        max_new_tokens=params.rollout.max_new_tokens)
    table = pd.DataFrame({"prompt_index": rollouts["prompt_index"], "sample_index": rollouts["sample_index"],
                          **components})
    metrics = {f"{name}_mean": float(table[name].mean()) for name in components}
    metrics["total_std"] = float(table["total"].std(ddof=0))
    log(f"score@{round_key}: {metrics}")
    with atomic_dir(f"scores/{round_key}") as out:
        write_parquet_into(out, "scores.parquet", table)
        write_json_into(out, "state.json", {"reward_normalizers": normalizers})
    write_json(f"metrics/{round_key}/score.json", metrics)


if __name__ == "__main__":
    run_stage(main, name="score", needs_round=True)
