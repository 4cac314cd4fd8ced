"""Build the train and eval prompt sets: read, deduplicate, filter by length, split with a seed."""

from rlhf_core.io import atomic_dir, write_json, write_parquet_into
from rlhf_core.phases.data import prepare_prompts, read_prompt_records
from rlhf_core.runtime.cli import log, ready, run_stage


def main(params, args):
    """Build the prompt sets (prompts/train.parquet, prompts/eval.parquet)."""
    records = read_prompt_records(params)
    ready()
    sets = prepare_prompts(records, max_chars=params.prepare.max_prompt_chars, too_long=params.prepare.too_long,
                           eval_fraction=params.prepare.eval_fraction, seed=params.seed)
    log(f"prepare: {sets.stats}")
    with atomic_dir("prompts") as out:
        write_parquet_into(out, "train.parquet", sets.train)
        write_parquet_into(out, "eval.parquet", sets.eval)
    write_json("metrics/prepare.json", sets.stats)


if __name__ == "__main__":
    run_stage(main, name="prepare")
