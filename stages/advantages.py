"""Token rewards (score − β·KL), the algorithm's advantages and returns, and the state for the next round."""

from rlhf_core.errors import DataError
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
    """Compute advantages/<round>/advantages.parquet and state.json (KL coefficient, reward baseline)."""
    import pandas as pd

    from rlhf_core.rl.advantages import advantages_of_round

    round_key = args.round
    rollouts = read_parquet(f"rollouts/{round_key}/rollouts.parquet", ("prompt_index", "logprobs", "values", "ended_with_eos")
                            + (("ref_logprobs",) if params.uses_reference else ()))  # KL-free: none stored
    scores = read_parquet(f"scores/{round_key}/scores.parquet", ("total",))
    if len(scores) != len(rollouts):
        raise DataError(f"scores/{round_key} has {len(scores)} rows for {len(rollouts)} rollouts; re-run score@{round_key}")
    ready()
    # State carried across rounds travels inside the checkpoint this round starts from (none for sft).
    carried = read_state(checkpoint_dir(params.rounds[round_key].start_from))
    components = None
    if params.grpo.normalize == "components":  # GDPO: each weighted reward component and its weight
        from rlhf_core.phases.rewards import reward_components

        components = reward_components(scores, params.score.scorers, params.score.missing_eos_penalty)
    arrays, metrics, state = advantages_of_round(params, rollouts, scores, carried,
                                                 seed=params.round_seed(round_key, "advantages"),
                                                 where=f"rollouts/{round_key}", components=components)
    auto = params.describe_auto("reward_coef")  # `kl.reward_coef auto → 0.05 (ppo)` when it is auto
    log(f"advantages@{round_key}{f' ({auto})' if auto else ''}: {metrics}")
    with atomic_dir(f"advantages/{round_key}") as out:
        write_parquet_into(out, "advantages.parquet", pd.DataFrame(arrays))
        write_json_into(out, "state.json", state)
    write_json(f"metrics/{round_key}/advantages.json", {k: v for k, v in metrics.items() if k != "estimator"})


if __name__ == "__main__":
    run_stage(main, name="advantages", needs_round=True)
